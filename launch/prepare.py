r"""Make a run's derived artefacts: `python -m launch.prepare --config=FILE[:ARG] --workdir=DIR`.

    python -m launch.build_data --dataset=synthetic_catalog/smoke
    python -m launch.prepare --config=configs/fashionvil.py:smoke --workdir=runs/fashionvil_smoke
    python -m launch.train --config=configs/fashionvil.py:smoke --workdir=runs/fashionvil_smoke

Give it the same --config (with the same --config.KEY overrides) and --workdir as launch.train.
It makes what the config needs (fashion_jax/prepare/manifest.py `needed`) into <workdir>/prepared/
and records each in <workdir>/prepared/manifest.json; launch.train and launch.evaluate then fill
the config keys from it:
  FashionViL (objective.tasks.pac > 0)   data.attributes: pseudo-attributes mined from the train
                                         split (prepare/attributes.py)
  FashionViL (objective.tasks.mpfc > 0)  data.vq_codes: the VQ tokenizer (the configs/vqvae.py
                                         variant of the same image size and grid) trained into
                                         <workdir>/prepared/vqvae, then its codes of every train
                                         view (prepare/vq_codes.py)
  FashionBERT, with --config.data.patch_features=prepared (and whole views:
      --config.data.augment.crop_scale="(1.0, 1.0)")   data.patch_features (prepare/patches.py)
Other configs need nothing (it says so and exits 0).

Rerunning skips what is done (an interrupted tokenizer training resumes; SIGTERM saves it and
exits 0); --overwrite remakes the artefacts (and retrains the tokenizer); --only=a,b restricts
to some. An artefact made for another dataset or config (image size, grid, text fields, ...) is
refused with the differences and the --overwrite command. The VQ tokenizer's config: the
matching variant, or --vqvae_config=vqvae:base (a fashion_jax.configs spec), with
--vqvae=KEY=VALUE overrides, e.g. --vqvae=total_steps=300 --vqvae=batch_size=32.
"""

import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fashion_jax import cli
from fashion_jax.prepare import make
from fashion_jax.prepare import manifest
from fashion_jax.prepare import vq_codes
from fashion_jax.train import config_check

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg] (as launch.train).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (as launch.train); artefacts "
                               "go to <workdir>/prepared/.")
_ONLY = flags.DEFINE_list("only", None, "Make only these artefacts (attributes, vq_codes, "
                          "patch_features); default: every one the config needs.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Remake artefacts that exist.")
_VQVAE_CONFIG = flags.DEFINE_string("vqvae_config", "", "The VQ tokenizer's config spec "
                                    "(vqvae:smoke, path.py:arg); default: the configs/vqvae.py "
                                    "variant of the same image size and grid.")
_VQVAE = flags.DEFINE_multi_string("vqvae", [], "KEY=VALUE override of the tokenizer's config.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per forward pass when encoding.")
_PATCH_DTYPE = flags.DEFINE_enum("patch_dtype", "float16", ["float16", "float32"],
                                 "Stored dtype of FashionBERT's patch features.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  config_name = config_flags.get_config_filename(flags.FLAGS["config"])
  command = "python -m launch.prepare " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  try:
    status = make.make_all(config, workdir, only=_ONLY.value, overwrite=_OVERWRITE.value,
                           command=command, config_name=config_name,
                           vqvae_config=_VQVAE_CONFIG.value, vqvae_overrides=_VQVAE.value,
                           batch_size=_BATCH.value, patch_dtype=_PATCH_DTYPE.value)
  except vq_codes.Interrupted as e:
    logging.warning("%s", e)
    return
  except (manifest.PrepareError, config_check.ConfigError, FileNotFoundError) as e:
    # A config the step cannot serve, a dataset that is not built, a foreign manifest: one line.
    raise cli.one_line_exit("launch.prepare", e) from None
  if not status:
    print(f"{config_name}: needs no prepared artefacts (fashion_jax/prepare/manifest.py "
          "`needed`); nothing to do.")
    return
  made = [n for n, s in status.items() if s == make.MADE]
  print(f"{manifest.manifest_path(workdir)}: {', '.join(f'{n} {s}' for n, s in status.items())}"
        f"{'' if made else ' (all up to date)'}. launch.train and launch.evaluate with the same "
        "--config and --workdir read them.", flush=True)


if __name__ == "__main__":
  cli.run(main)
