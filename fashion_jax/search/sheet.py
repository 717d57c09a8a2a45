"""Search results as a contact sheet: one row per query (the query, then its k results).

PNG (`results_png`): each cell is the product thumbnail (nearest-neighbour upscaled to `cell`
pixels) with its rank, score and title; a text query's cell is its text, an image query's cell
its image (with the modification text under it for a TGIR query). HTML (`results_html`): the
same table with inline base64 PNG thumbnails (one self-contained file). `write_results` picks
the format from the file's extension.
"""

import base64
import html
import io
import os
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_FONT = ImageFont.load_default()


def _query_cell(query: dict, cell: int) -> Image.Image:
  img = Image.new("RGB", (cell, cell), (235, 240, 250))
  if query.get("image") is not None:
    img.paste(Image.fromarray(np.asarray(query["image"], np.uint8)).resize(
        (cell - 8, cell - 8), Image.NEAREST), (4, 4))
  elif query.get("text"):
    d = ImageDraw.Draw(img)
    for i, line in enumerate(textwrap.wrap(query["text"], width=max(8, cell // 7))[:10]):
      d.text((4, 4 + 12 * i), line, fill=(0, 0, 80), font=_FONT)
  return img


def results_png(queries: Sequence[dict], results: Sequence[Sequence], thumbs: np.ndarray | None,
                cell: int = 96, correct: Sequence[set] | None = None) -> Image.Image:
  """queries: [{'text': str | None, 'image': uint8 [S, S, 3] | None}]; results: per query a
  list of search Hits; thumbs: uint8 [N, t, t, 3] (None: titles only); correct: per query the
  rows to frame in green (e.g. the queried product)."""
  k = max([len(r) for r in results] + [1])
  text_h = 3 * 12 + 4
  w, h = (k + 1) * (cell + 6) + 6, len(queries) * (cell + text_h + 6) + 6
  sheet = Image.new("RGB", (w, h), (255, 255, 255))
  d = ImageDraw.Draw(sheet)
  for qi, (q, hits) in enumerate(zip(queries, results)):
    y = 6 + qi * (cell + text_h + 6)
    sheet.paste(_query_cell(q, cell), (6, y))
    label = "query" if q.get("image") is None or not q.get("text") else "+ " + q["text"]
    for li, line in enumerate(textwrap.wrap(label, width=cell // 6)[:3]):
      d.text((6, y + cell + 2 + 12 * li), line, fill=(0, 0, 80), font=_FONT)
    for j, hit in enumerate(hits):
      x = 6 + (j + 1) * (cell + 6)
      if thumbs is not None:
        sheet.paste(Image.fromarray(thumbs[hit.row]).resize((cell, cell), Image.NEAREST), (x, y))
      if correct is not None and hit.row in correct[qi]:
        d.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=(0, 170, 0), width=3)
      lines = [f"#{hit.rank}  score {hit.score:.3f}"] + textwrap.wrap(
          hit.product.get("title", hit.product.get("product_id", "")), width=cell // 6)[:2]
      for li, line in enumerate(lines):
        d.text((x, y + cell + 2 + 12 * li), line, fill=(0, 0, 0) if li else (110, 110, 110),
               font=_FONT)
  return sheet


def _data_uri(image: np.ndarray) -> str:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def results_html(queries: Sequence[dict], results: Sequence[Sequence],
                 thumbs: np.ndarray | None, cell: int = 96) -> str:
  """The same table as results_png, as one self-contained HTML page."""
  rows = []
  for q, hits in zip(queries, results):
    qcell = []
    if q.get("image") is not None:
      qcell.append(f'<img src="{_data_uri(q["image"])}" width={cell} height={cell}>')
    if q.get("text"):
      qcell.append(f"<div>{html.escape(q['text'])}</div>")
    cells = [f"<td class=q>{''.join(qcell)}</td>"]
    for hit in hits:
      img = (f'<img src="{_data_uri(thumbs[hit.row])}" width={cell} height={cell}>'
             if thumbs is not None else "")
      fields = "<br>".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in hit.product.items()
                           if k in ("product_id", "title", "subcategory", "brand") and v)
      cells.append(f"<td>{img}<div>#{hit.rank} score {hit.score:.3f}</div>"
                   f"<div class=f>{fields}</div></td>")
    rows.append("<tr>" + "".join(cells) + "</tr>")
  style = ("body{font-family:sans-serif}td{vertical-align:top;width:%dpx;font-size:11px;"
           "padding:4px}td.q{background:#eef}img{image-rendering:pixelated}.f{color:#555}" % cell)
  return (f"<!doctype html><html><head><meta charset=utf-8><style>{style}</style>"
          f"<title>fashion_jax search</title></head><body><table>{''.join(rows)}</table>"
          "</body></html>")


def write_results(path: str, queries, results, thumbs, cell: int = 96, correct=None) -> str:
  """Writes `path` as .png or .html (by extension)."""
  ext = os.path.splitext(path)[1].lower()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if ext == ".png":
    img = results_png(queries, results, thumbs, cell, correct)
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
  elif ext in (".html", ".htm"):
    with open(path, "w") as f:
      f.write(results_html(queries, results, thumbs, cell))
  else:
    raise ValueError(f"Results file {path!r}: use a .png or .html extension.")
  return path
