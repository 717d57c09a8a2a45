"""What a system is: a model plus an objective. The trainer and evaluators only see this.

A system wraps one Flax module and says how to initialise it, how to compute the training loss
from a batch, and (for two-tower systems) how to embed images and texts for retrieval. Adding a
fifth system means one new module here, one config: nothing in train/ or evaluate/.

Batches are dicts of arrays with a leading global batch axis. Image fields are uint8
[B, H, W, 3]; systems normalise on the device (shipping uint8 saves host work and bandwidth).

Optional: `System.required_features`, the batch keys `loss` reads: a tuple of names, or a
classmethod / staticmethod `required_features(config)` returning names or {name: what needs it}
(e.g. {'vq_codes': 'the MPFC task (objective.tasks.mpfc > 0)'}), computed from the config
without building the model. They must be exactly the keys of `dummy_batch` (tests/
test_features.py holds every system to it). Before anything is built or compiled,
train/config_check.check_train_features compares them with the input's features
(data/features.py feature_spec for the default pipeline) and names the config key that turns a
missing one on. A system without it is not checked.
"""

from typing import Any, Mapping, Protocol

import jax
import numpy as np

Batch = Mapping[str, Any]
Params = Any


class System(Protocol):
  """Interface implemented by fashion_jax.systems.<name>.System."""

  config: Any  # The full ml_collections config the system was built from.

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of the right shapes/dtypes (zeros) for init and ahead-of-time compilation."""

  def init(self, rng: jax.Array, batch: Batch) -> Params:
    """Initial params (a pytree that may hold flax LogicallyPartitioned boxes).

    Called under jax.eval_shape and under jit with out_shardings, never eagerly on one device
    for a large model.
    """

  def loss(self, params: Params, batch: Batch, rng: jax.Array, train: bool = True
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and a dict of scalar metrics, computed over the GLOBAL batch."""


class TwoTowerSystem(System, Protocol):
  """A system with a joint embedding space (FashionCLIP, E2, FashionViL's ITC head)."""

  def embed_images(self, params: Params, images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> L2-normalised float32 [B, D]."""

  def embed_texts(self, params: Params, tokens: jax.Array) -> jax.Array:
    """int32 [B, L] token ids -> L2-normalised float32 [B, D]."""

  def logit_scale(self, params: Params) -> jax.Array:
    """Scalar multiplier applied to cosine similarities (zero-shot scoring uses it)."""


def required_features(system_class: type, config: Any) -> dict[str, str] | None:
  """{feature: what needs it ('' = unnamed)} declared by `system_class` for `config`, or None
  when it declares nothing (module docstring)."""
  need = getattr(system_class, "required_features", None)
  if need is None:
    return None
  if callable(need):
    need = need(config)
  if isinstance(need, str):
    raise TypeError(f"{system_class.__module__}.{system_class.__name__}.required_features is "
                    f"the string {need!r}; use a tuple of feature names.")
  return dict(need) if isinstance(need, Mapping) else dict.fromkeys(need, "")
