"""Reading and writing HF/PyTorch checkpoints as flat {key: numpy array} dicts.

Every importer (CLIP, BERT, ResNet) goes through `load_hf_checkpoint`, and every converter checks
the state it receives with `check_state` before assigning anything: a checkpoint with another
architecture, a missing key or a wrong shape fails with an error naming the key and both shapes,
never a silent partial load. Every weights file is read through `read_safetensors` /
`_read_weight_file` (or checked with `check_safetensors` before transformers reads it), so a
truncated or corrupt file is a CorruptWeightsError naming the file and its size.

Export directories are prepared by `prepare_export_dir`, the one place that decides what
`--overwrite` may delete (only the files an export writes; see EXPORT_FILES).
"""

import itertools
import json
import os
import pathlib
import pickle
import re
from typing import Mapping

import numpy as np

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class CheckpointMismatchError(ValueError):
  """The checkpoint does not match the architecture it is being loaded into."""


def resolve_hf_path(path_or_id: str) -> pathlib.Path:
  """A local HF directory as is; otherwise a hub id downloaded with huggingface_hub.

  The hub is reached only for a string that is not an existing directory, and only where the
  network allows: offline, the error says that the path does not exist locally either.
  """
  path = pathlib.Path(os.path.expanduser(str(path_or_id)))
  if path.is_dir():
    return path
  if path.exists():
    raise FileNotFoundError(f"{path_or_id!r} is a file; expected an HF model directory.")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    local = huggingface_hub.snapshot_download(
        str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"])
  except Exception as e:  # Offline, unknown id, auth...: one clear message.
    raise FileNotFoundError(
        f"{path_or_id!r} is not a local directory and could not be fetched from the HF hub "
        f"({type(e).__name__}: {e}).") from e
  return pathlib.Path(local)


class CorruptWeightsError(ValueError):
  """A weights file is truncated or otherwise unreadable; the message names it and its size."""


def _corrupt(path: pathlib.Path, detail: str) -> CorruptWeightsError:
  size = path.stat().st_size if path.exists() else 0
  return CorruptWeightsError(
      f"{path} ({size} bytes) is truncated or corrupt: {detail}. Re-download the model, or "
      "re-export it (python -m launch.export ... --overwrite).")


def check_safetensors(path) -> None:
  """Raises CorruptWeightsError unless `path` is a whole safetensors file.

  Reads only the header: its length (8 bytes, little endian), the JSON, and the end of the last
  tensor's byte range; a file shorter than that end (an interrupted download or copy) fails
  here, naming itself, before any loader (ours or transformers') touches it.
  """
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise _corrupt(path, "shorter than the 8-byte safetensors header length")
    n = int.from_bytes(head, "little")
    if n > size - 8:
      raise _corrupt(path, f"its header alone claims {n} bytes")
    try:
      header = json.loads(f.read(n))
      end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
      raise _corrupt(path, f"unreadable safetensors header ({type(e).__name__}: {e})") from e
  if 8 + n + end > size:
    raise _corrupt(path, f"its tensors need {8 + n + end} bytes")


def read_safetensors(path, framework: str = "np") -> dict:
  """{key: array} of a safetensors file ('np': numpy, 'pt': torch tensors), checked first
  (check_safetensors); a loader error is re-raised as CorruptWeightsError naming the file."""
  path = pathlib.Path(path)
  check_safetensors(path)
  if framework == "pt":
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  else:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return dict(load_file(str(path)))
  except Exception as e:  # safetensors raises SafetensorError (a bare Exception subclass).
    raise _corrupt(path, f"{type(e).__name__}: {e}") from e


def check_model_dir(directory) -> None:
  """check_safetensors on the weights of a transformers directory (before from_pretrained)."""
  for f in sorted(pathlib.Path(directory).glob("*.safetensors")):
    check_safetensors(f)


def _read_weight_file(f: pathlib.Path) -> dict[str, np.ndarray]:
  if f.suffix == ".safetensors":
    return read_safetensors(f)
  import torch  # pylint: disable=g-import-not-at-top
  try:
    # weights_only=True: a .bin is a pickle and must not run code on load.
    sd = torch.load(str(f), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if "Weights only load failed" in str(e):
      # A pickle that would build objects other than tensors (it may run code): refused as
      # untrusted, which is not the same as truncated.
      raise pickle.UnpicklingError(f"Refused to load {f}: {e}") from e
    raise _corrupt(f, f"{type(e).__name__}: {str(e)[:300]}") from e
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise _corrupt(f, f"{type(e).__name__}: {str(e)[:300]}") from e
  return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
          for k, v in sd.items()}


def load_hf_config(path_or_id: str) -> tuple[dict, pathlib.Path]:
  """(config.json as a dict, the local directory) of an HF model, without reading weights."""
  root = resolve_hf_path(path_or_id)
  config_file = root / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{config_file} not found: not an HF model directory.")
  return json.loads(config_file.read_text()), root


def load_hf_checkpoint(path_or_id: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, flat state dict of numpy arrays) of an HF model directory."""
  config, root = load_hf_config(path_or_id)
  for name in WEIGHT_FILES:
    f = root / name
    if not f.exists():
      continue
    if name.endswith(".index.json"):
      shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
      state = {}
      for shard in shards:
        state.update(_read_weight_file(root / shard))
      return config, state
    return config, _read_weight_file(f)
  raise FileNotFoundError(f"No weights in {root}: expected one of {', '.join(WEIGHT_FILES)}.")


def check_state(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, np.ndarray], *,
                what: str, ignore_unexpected: tuple[str, ...] = ()) -> None:
  """Raises CheckpointMismatchError unless `state` has exactly the `expected` keys and shapes.

  Keys matching a prefix in `ignore_unexpected` (e.g. buffers like position_ids, or heads we do
  not model) may be present without being expected.
  """
  problems = []
  for key, shape in expected.items():
    if key not in state:
      problems.append(f"missing key {key!r} (expected shape {tuple(shape)})")
    elif tuple(state[key].shape) != tuple(shape):
      problems.append(f"key {key!r}: checkpoint shape {tuple(state[key].shape)} != "
                      f"expected shape {tuple(shape)}")
  for key in state:
    if key not in expected and not key.startswith(tuple(ignore_unexpected)):
      problems.append(f"unexpected key {key!r} with shape {tuple(state[key].shape)}")
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise CheckpointMismatchError(f"{what}: checkpoint does not match the architecture:\n  "
                                  f"{shown}{more}")


# What an export writes, by exact name: weights, configs, tokenizer and processor files, and the
# sub-directories of the multi-part exports (E2's clip/, FashionBERT's and FashionViL's bert/,
# fusion_bert/, cnn/). `overwrite` deletes only these, so a mistyped --out never wipes
# someone's data: a directory holding anything else is refused, every foreign path named.
# Weight files we never write (pytorch_model.bin, sharded safetensors) are listed because a
# stale one of an older export would shadow ours in transformers; replacing them is the point.
EXPORT_FILES = frozenset({
    # Weights and configs (ours and transformers').
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model.bin.index.json", "config.json", "generation_config.json",
    "e2_config.json", "fashionbert.json", "fashionbert.safetensors", "fashionvil.json",
    "fashionvil.safetensors",
    # Tokenizers and processors (what transformers' save_pretrained writes).
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json",
    # The ONNX export (interop/onnx_export.py, launch.export --format=onnx).
    "image_encoder.onnx", "text_encoder.onnx", "preprocess.json"})
_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
EXPORT_SUBDIRS = frozenset({"clip", "bert", "fusion_bert", "cnn"})


def _export_owned(out: pathlib.Path, top: bool = True
                  ) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """(files an export writes, everything else) under `out` (EXPORT_FILES, and EXPORT_SUBDIRS one
  level down). A foreign directory is listed as itself; symbolic links are never followed."""
  owned, foreign = [], []
  for child in sorted(out.iterdir()):
    if child.is_dir() and not child.is_symlink():
      if not top or child.name not in EXPORT_SUBDIRS:
        foreign.append(child)
        continue
      sub_owned, sub_foreign = _export_owned(child, top=False)
      owned += sub_owned
      foreign += sub_foreign
    elif child.name in EXPORT_FILES or _SHARD.fullmatch(child.name):
      owned.append(child)
    else:
      foreign.append(child)
  return owned, foreign


def _foreign_names(out: pathlib.Path, foreign: list[pathlib.Path], limit: int = 20) -> str:
  """The foreign files (those inside a foreign directory too) relative to `out`, at most
  `limit` of them named (the walk stops there: --out may be a huge directory)."""
  names, more = [], False
  for p in foreign:
    if p.is_dir() and not p.is_symlink():
      walk = (pathlib.Path(root, f) for root, _, fs in os.walk(p) for f in sorted(fs))
      entries = list(itertools.islice(walk, limit + 1)) or [p]
    else:
      entries = [p]
    for e in entries:
      if len(names) == limit:
        more = True
        break
      names.append(str(e.relative_to(out)) + ("/" if e.is_dir() else ""))
    if more:
      break
  return ", ".join(names) + (" and more" if more else "")


def prepare_export_dir(out_dir: str, overwrite: bool = False) -> pathlib.Path:
  """Creates `out_dir`; refuses a non-empty one unless `overwrite`.

  With `overwrite`, the files an export writes (EXPORT_FILES, also in EXPORT_SUBDIRS) are deleted
  first, so no stale file of a previous export (a `pytorch_model.bin` next to a new
  `model.safetensors`, which transformers would prefer to load in some versions) survives. If
  the directory holds anything else (the user's labels.json, NOTES.md, another directory), it is
  refused with FileExistsError naming those files and NOTHING is deleted: a user's file cannot be
  told from ours by its suffix, so the rule is by exact name.
  """
  out = pathlib.Path(out_dir)
  if out.exists() and not out.is_dir():
    raise NotADirectoryError(f"Export path {out} exists and is not a directory.")
  if out.exists() and any(out.iterdir()):
    if not overwrite:
      raise FileExistsError(f"Export directory {out} is not empty; pass overwrite=True "
                            "(--overwrite) to replace the files of a previous export.")
    owned, foreign = _export_owned(out)
    if foreign:
      raise FileExistsError(
          f"Export directory {out} holds {_foreign_names(out, foreign)}, which no export "
          "writes; --overwrite (overwrite=True) only replaces the files of a previous export, "
          "so nothing was deleted. Choose another --out, or move those files away yourself.")
    for f in owned:
      f.unlink()
    for sub in EXPORT_SUBDIRS:
      if (out / sub).is_dir() and not (out / sub).is_symlink() and not any((out / sub).iterdir()):
        (out / sub).rmdir()
  out.mkdir(parents=True, exist_ok=True)
  return out


def save_safetensors(state: Mapping[str, np.ndarray], path: str, metadata=None) -> None:
  """Writes a flat state dict as safetensors (C-contiguous arrays, 0-d kept 0-d), format 'pt'."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  # Not np.ascontiguousarray: it turns a 0-d array (CLIP's logit_scale) into shape [1].
  arrays = {k: np.asarray(v, order="C") for k, v in state.items()}
  save_file(arrays, str(path), metadata={"format": "pt", **(metadata or {})})
