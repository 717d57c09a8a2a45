r"""Export a training run's checkpoint to PyTorch / HF transformers.

    python -m launch.export --workdir=runs/fashionclip_smoke --out=exported/fc [--step=N] [--overwrite]

Reads `<workdir>/config.json` (written by training), restores the params of the newest (or
--step) checkpoint and calls the system's `export(params, out_dir, overwrite)`: FashionCLIP
writes a transformers CLIPModel directory (config.json, model.safetensors, tokenizer and
preprocessor files) that `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` load.
A non-empty --out is refused unless --overwrite.
"""

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the contents of a non-empty --out.")
flags.mark_flags_as_required(["workdir", "out"])


def export(workdir: str, out: str, *, step: int | None = None, overwrite: bool = False):
  """Exports checkpoint `step` (None = newest) of `workdir` to `out`; returns (out, step)."""
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top

  system, params, step = loop.load_trained(workdir, step=step)
  if not hasattr(system, "export"):
    raise ValueError(f"System {system.config.system!r} has no export().")
  return system.export(params, out, overwrite=overwrite), step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  out, step = export(_WORKDIR.value, _OUT.value, step=_STEP.value, overwrite=_OVERWRITE.value)
  print(f"Exported step {step} of {_WORKDIR.value} to {out}")


if __name__ == "__main__":
  app.run(main)
