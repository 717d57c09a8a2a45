r"""Export a training run's checkpoint to PyTorch / HF transformers, or its towers to ONNX.

    python -m launch.export --workdir=runs/fashionclip_smoke --out=exported/fc [--step=N] \
        [--overwrite] [--format=hf|onnx]

Reads `<workdir>/config.json` (written by training), restores the params of the newest (or
--step) checkpoint and calls the system's `export(params, out_dir, overwrite)`:
  fashionclip  a transformers CLIPModel directory (config.json, model.safetensors, tokenizer and
               preprocessor files) that `CLIPModel.from_pretrained` / `CLIPProcessor` load;
  e2           E2Torch files (interop/e2_torch.py) + clip/, the CLIP part as a CLIPModel dir;
  fashionbert  bert/ (BertModel) [+ cnn/ (ResNetModel)] + FashionBertTorch files
               (interop/fashionbert_torch.py; pooled-pixel patches need no cnn/);
  fashionvil   bert/ (BertModel) + cnn/ (ResNetModel) + FashionViLTorch files.
--format=onnx (interop/onnx_export.py, docs/onnx.md) writes image_encoder.onnx, text_encoder.onnx
and preprocess.json (+ tokenizer and preprocessor files) for fashionclip (model.family clip or
siglip); other systems are refused by name. The default --format=hf writes the directories above.
A non-empty --out is refused unless --overwrite, and --overwrite replaces only the files an
export writes: a directory that also holds anything else (your notes, labels, data) is refused
with those paths named, and nothing is deleted (interop/hf_io.prepare_export_dir).
"""

import importlib
import pkgutil

from absl import app
from absl import flags

from fashion_jax import cli
from fashion_jax import systems
from fashion_jax.interop import onnx_export
from fashion_jax.train import restore


def exporting_systems() -> list[str]:
  """The built-in systems (fashion_jax/systems/) whose System has an export()."""
  names = []
  for info in pkgutil.iter_modules(systems.__path__):
    module = importlib.import_module(systems.module_name(info.name))
    if hasattr(getattr(module, "System", None), "export"):
      names.append(info.name)
  return sorted(names)


def export(workdir: str, out: str, *, step: int | None = None, overwrite: bool = False,
           export_format: str = "hf"):
  """Exports checkpoint `step` (None = newest) of `workdir` to `out`; returns (out, step).

  `export_format`: 'hf' (the system's export()) or 'onnx' (onnx_export.export_system); any other
  name is a ValueError raised before the checkpoint is read.
  """
  onnx_export.check_format(export_format)
  system, params, step = restore.load_trained(workdir, step=step)
  if export_format == "onnx":
    return onnx_export.export_system(system, params, out, overwrite=overwrite), step
  if not hasattr(system, "export"):
    raise ValueError(f"System {system.config.system!r} of {workdir} has no export(); the "
                     f"systems that export are {exporting_systems()}.")
  return system.export(params, out, overwrite=overwrite), step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    out, step = export(f.workdir, f.out, step=f.step, overwrite=f.overwrite,
                       export_format=f.format)
  except (FileNotFoundError, FileExistsError) as e:  # No checkpoint / run; --out not empty.
    raise cli.one_line_exit("launch.export", e) from None
  print(f"Exported step {step} of {f.workdir} to {out}")


if __name__ == "__main__":
  # Flags are defined only when run as a program: tests import `export` beside other launch
  # modules that define flags of the same names (absl refuses a flag defined twice).
  flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
  flags.DEFINE_bool("overwrite", False, "Replace a previous export in --out (only the files an "
                    "export writes; anything else is refused).")
  flags.DEFINE_enum("format", "hf", list(onnx_export.FORMATS),
                    "hf: the system's PyTorch / transformers export; onnx: image_encoder.onnx "
                    "and text_encoder.onnx (+ preprocess.json); fashionclip (CLIP or SigLIP) only.")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
