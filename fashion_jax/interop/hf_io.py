"""Reading and writing HF/PyTorch checkpoints as flat {key: numpy array} dicts.

Every importer (CLIP, BERT, ResNet) goes through `load_hf_checkpoint`, and every converter checks
the state it receives with `check_state` before assigning anything: a checkpoint with another
architecture, a missing key or a wrong shape fails with an error naming the key and both shapes,
never a silent partial load.
"""

import json
import os
import pathlib
import shutil
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
        str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "merges.txt"])
  except Exception as e:  # Offline, unknown id, auth...: one clear message.
    raise FileNotFoundError(
        f"{path_or_id!r} is not a local directory and could not be fetched from the HF hub "
        f"({type(e).__name__}: {e}).") from e
  return pathlib.Path(local)


def _read_weight_file(f: pathlib.Path) -> dict[str, np.ndarray]:
  if f.suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(str(f)))
  import torch  # pylint: disable=g-import-not-at-top
  # weights_only=True: a .bin is a pickle and must not run code on load.
  sd = torch.load(str(f), map_location="cpu", weights_only=True)
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


# What an export writes (weights, configs, tokenizer and processor files). `overwrite` only
# deletes a directory made of these, so a mistyped --out never wipes someone's data.
EXPORT_SUFFIXES = frozenset({".safetensors", ".bin", ".json", ".txt", ".model", ".npz", ".pt",
                             ".pth", ".md"})


def prepare_export_dir(out_dir: str, overwrite: bool = False) -> pathlib.Path:
  """Creates `out_dir` empty; refuses a non-empty one unless `overwrite`.

  With `overwrite`, the old contents are deleted first, so no stale file of a previous export
  (a `pytorch_model.bin` next to a new `model.safetensors`, which transformers would prefer to
  load in some versions) survives. Only a directory whose files all have export suffixes
  (EXPORT_SUFFIXES) is deleted; anything else raises FileExistsError naming the first such file.
  """
  out = pathlib.Path(out_dir)
  if out.exists() and not out.is_dir():
    raise NotADirectoryError(f"Export path {out} exists and is not a directory.")
  if out.exists() and any(out.iterdir()):
    if not overwrite:
      raise FileExistsError(f"Export directory {out} is not empty; pass overwrite=True "
                            "(--overwrite) to replace its contents.")
    foreign = [p for p in sorted(out.rglob("*"))
               if not p.is_dir() and p.suffix.lower() not in EXPORT_SUFFIXES]
    if foreign:
      raise FileExistsError(
          f"Export directory {out} holds {foreign[0]}, which no export writes; refusing to "
          "delete it with --overwrite. Choose another --out or remove the directory yourself.")
    for child in out.iterdir():
      if child.is_dir() and not child.is_symlink():
        shutil.rmtree(child)
      else:
        child.unlink()
  out.mkdir(parents=True, exist_ok=True)
  return out


def save_safetensors(state: Mapping[str, np.ndarray], path: str, metadata=None) -> None:
  """Writes a flat state dict as safetensors (C-contiguous arrays, 0-d kept 0-d), format 'pt'."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  # Not np.ascontiguousarray: it turns a 0-d array (CLIP's logit_scale) into shape [1].
  arrays = {k: np.asarray(v, order="C") for k, v in state.items()}
  save_file(arrays, str(path), metadata={"format": "pt", **(metadata or {})})
