"""Zero-shot prompts: the one definition of the prompts and of the class embeddings made from them.

Every zero-shot path goes through this module: the zero-shot evaluator (evaluate/zeroshot.py, the
configs' zero-shot evals), `FashionCLIP.zero_shot_classify` / `class_embeddings` (api.py) and the
zero-shot figure (search/figures.py). The reference FashionCLIP package reported its benchmark
with one prompt set and classified with another; here a change of TEMPLATES changes every path.

  TEMPLATES = ("a photo of a {}", "{}"): FashionCLIP's prompt plus the bare label. Both are used
  and averaged (CLIP's prompt ensembling) because a catalog's text rarely reads like "a photo of
  a ...", so the bare label is closer to what the text tower was trained on.

For C labels and T templates, with embed(texts) any text tower (unnormalised is fine):
    c_k = normalize( sum_t normalize(embed(template_t.format(label_k))) )            [C, D]
    logits[n, k] = logit_scale * <normalize(image_n), c_k>                            [N, C]
    probabilities = softmax(logits, axis=1)
Both sides are L2-normalised and the model's logit scale is applied (the reference package
normalised one side and dropped the scale): the scale does not move the argmax but sets the
probabilities. numpy only, so importing it costs nothing (no TensorFlow, no JAX).
"""

from collections.abc import Callable, Sequence

import numpy as np

TEMPLATES = ("a photo of a {}", "{}")


def normalize(x) -> np.ndarray:
  """Rows of `x` scaled to unit L2 norm, float32 (a zero row stays zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def check_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
  """A template or a sequence of them -> tuple; ValueError unless each has exactly one '{}'."""
  templates = (templates,) if isinstance(templates, str) else tuple(templates)
  if not templates:
    raise ValueError("zero-shot needs at least one prompt template.")
  for t in templates:
    if t.count("{}") != 1:
      hint = " (it has no '{}' for the label)" if "{}" not in t else ""
      raise ValueError(f"prompt template {t!r} must contain exactly one '{{}}'{hint}.")
  return templates


def class_embeddings(embed_texts: Callable[[list[str]], np.ndarray], labels: Sequence[str],
                     templates: str | Sequence[str] = TEMPLATES) -> np.ndarray:
  """Prompt-ensembled label embeddings c, float32 [C, D] (module docstring formula).

  Args:
    embed_texts: list[str] of length C -> [C, D] (a text tower with its tokenizer).
    labels: the C label names.
    templates: format strings with exactly one '{}' (a single string is one template).
  """
  templates = check_templates(templates)
  labels = [str(l) for l in labels]
  if not labels:
    raise ValueError("zero-shot needs at least one label.")
  total = 0.0
  for t in templates:
    total = total + normalize(embed_texts([t.format(l) for l in labels]))
  return normalize(total)


def logits(image_emb, class_emb, logit_scale) -> np.ndarray:
  """logit_scale * cos(image, class): float32 [N, C]; both sides re-normalised here."""
  return float(logit_scale) * (normalize(image_emb) @ normalize(class_emb).T)


def probabilities(logits_: np.ndarray) -> np.ndarray:
  """Row-wise softmax of [N, C] logits, float32 (computed in float64)."""
  z = np.asarray(logits_, np.float64)
  z = np.exp(z - z.max(axis=1, keepdims=True))
  return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
