"""Matryoshka embeddings: one loss over nested prefixes of the embedding, and the truncation.

Matryoshka representation learning (Kusupati et al. 2022) trains an embedding whose first m
coordinates are a usable embedding on their own, for several m at once:

    L = sum_g c_g * L_pair( tn(img, m_g), tn(txt, m_g) )

with tn = `truncate_and_normalize` (keep the first m coordinates, then re-L2-normalise: a
prefix of a unit vector is not a unit vector, and every consumer of the embeddings, the
contrastive losses, cosine retrieval and faiss inner-product search, assumes unit vectors).
m = 0 names the full width. The same function serves training, evaluation
(evaluate/retrieval.py reports each dimension) and search (an index of the first m coordinates
is built from `truncate_and_normalize(embeddings, m)`), so a prefix is cut the same way
everywhere.

Deliberate choices:
* The weights c_g default to 1 each and are SUMMED (not averaged), as in the paper's
  `relative_importance`.
* L2 normalisation divides by max(||x||, EPS): a prefix that is exactly zero stays zero instead
  of becoming NaN (torch.nn.functional.normalize's convention).
* Numpy input gives a numpy result computed in numpy (float32 in, float32 out), so search code
  that never touches JAX can call it; anything else is computed with jax.numpy.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-12  # Floor of the norm in the re-normalisation.


def check_dims(dims: Sequence[int], width: int | None = None, what: str = "matryoshka_dims"
               ) -> tuple[int, ...]:
  """The validated dims as a tuple of ints (0 = full width).

  Raises:
    ValueError naming the bad value: a non-int or negative dim, a dim above `width` (when
    given), or a repeated dim (0 and `width` are the same dim).
  """
  out = []
  for d in dims:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
      raise ValueError(f"{what}={tuple(dims)!r}: {d!r} is not a non-negative int (0 = full).")
    if width is not None and d > width:
      raise ValueError(f"{what}={tuple(dims)!r}: {d} exceeds the embedding width {width}.")
    out.append(int(d))
  resolved = [width if (d == 0 and width is not None) else d for d in out]
  if len(set(resolved)) != len(resolved):
    raise ValueError(f"{what}={tuple(dims)!r} repeats a dimension (0 means the full width"
                     f"{'' if width is None else f' {width}'}).")
  return tuple(out)


def truncate_and_normalize(x: Any, dim: int) -> Any:
  """x[..., :dim] / max(||x[..., :dim]||_2, EPS): the Matryoshka prefix as a unit vector.

  Args:
    x: [..., D] embeddings (numpy or jax; need not be normalised).
    dim: m in [0, D]; 0 = the full width D (still re-normalised).

  Returns:
    [..., m] array of the same kind (numpy in -> numpy out) and dtype as `x`.
  """
  width = x.shape[-1]
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 0 <= dim <= width:
    raise ValueError(f"truncate_and_normalize: dim={dim!r} must be an int in [0, {width}] "
                     "(0 = full width).")
  m = width if dim == 0 else int(dim)
  if isinstance(x, np.ndarray):
    y = x[..., :m]
    norm = np.sqrt(np.sum(np.square(y, dtype=np.float64), axis=-1, keepdims=True))
    return (y / np.maximum(norm, EPS)).astype(x.dtype)
  y = x[..., :m]
  y32 = y.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(y32 * y32, axis=-1, keepdims=True))
  return (y32 / jnp.maximum(norm, EPS)).astype(y.dtype)



def matryoshka_loss(loss_fn: Callable[..., tuple[jax.Array, dict]], img: jax.Array,
                    texts: Sequence[jax.Array], dims: Sequence[int],
                    weights: Sequence[float] | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum_g c_g * loss_fn(tn(img, m_g), [tn(t, m_g) for t in texts]).

  Args:
    loss_fn: (img [B, m], texts list of [B, m]) -> (scalar loss, metrics); e.g. a multi-field
      loss (losses/multifield.py) closed over its masks and weights.
    img: [B, D] image embeddings.
    texts: the text embeddings [B, D] each (one per field).
    dims: the m_g (0 = D), validated by `check_dims`.
    weights: the c_g (None = 1 each); same length as dims.

  Returns:
    (loss, metrics): metrics holds `loss@d{m}` (the unweighted loss_fn value at m) for every
    m, and loss_fn's metrics of the LAST dim (list the full width last to report those).
  """
  dims = check_dims(dims, img.shape[-1])
  if not dims:
    raise ValueError("matryoshka_loss: dims is empty.")
  if weights is None:
    weights = (1.0,) * len(dims)
  if len(weights) != len(dims):
    raise ValueError(f"matryoshka weights {tuple(weights)!r} must have one entry per dim "
                     f"{dims!r}.")
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  last = {}
  for m, c in zip(dims, weights):
    loss, last = loss_fn(truncate_and_normalize(img, m),
                         [truncate_and_normalize(t, m) for t in texts])
    total = total + float(c) * loss
    metrics[f"loss@d{m or img.shape[-1]}"] = jax.lax.stop_gradient(loss)
  metrics.update(last)
  return total, metrics
