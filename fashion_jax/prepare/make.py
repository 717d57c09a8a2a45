"""Makes the artefacts a config needs into <workdir>/prepared/ (the library of launch.prepare).

`make_all(config, workdir)` makes each artefact of manifest.needed(config) (attributes.py,
vq_codes.py, patches.py) and records it in <workdir>/prepared/manifest.json (manifest.py) once
its file is complete (written under a temporary name, then renamed). Idempotent: an artefact
whose entry and file exist and whose dataset and config values match is skipped; one that was
made for another dataset or config is refused (ArtefactMismatchError naming the differences)
unless `overwrite`, which remakes it. The VQ tokenizer's own training run
(<workdir>/prepared/vqvae) resumes where it stopped and is not retrained once finished; with
`overwrite` it is deleted and trained again. One process: not for multi-host runs.
"""

import os
import shutil
from collections.abc import Callable, Sequence

import ml_collections

from fashion_jax.prepare import attributes
from fashion_jax.prepare import manifest
from fashion_jax.prepare import patches
from fashion_jax.prepare import vq_codes

MADE, SKIPPED = "made", "skipped"


def make_all(config: ml_collections.ConfigDict, workdir: str, *,
             only: Sequence[str] | None = None, overwrite: bool = False, command: str = "",
             config_name: str = "", vqvae_config: str = "", vqvae_overrides: Sequence[str] = (),
             batch_size: int = 64, patch_dtype: str = "float16",
             log: Callable[[str], None] = print) -> dict[str, str]:
  """Makes the needed artefacts (module docstring); returns {name: 'made' | 'skipped'}.

  Args:
    config: the run's config (as launch.train will read it).
    workdir: the run's workdir; artefacts go to <workdir>/prepared/.
    only: names of artefacts to consider (default: every needed one). A name the config does
      not need is a PrepareError naming what it needs.
    overwrite: remake artefacts that exist (also those made for another dataset or config).
    command, config_name: recorded in the manifest (the launch.prepare command line, --config).
    vqvae_config, vqvae_overrides: the VQ tokenizer's config spec ('' = the matching
      configs/vqvae.py variant) and KEY=VALUE overrides (vq_codes.tokenizer_config).
    batch_size: images per forward pass when encoding codes or patch features.
    patch_dtype: stored dtype of patch features ('float16' | 'float32').
    log: called with one line per artefact.

  Raises:
    manifest.ArtefactMismatchError: an existing artefact was made for another dataset or
      config and overwrite is off.
    vq_codes.Interrupted: the tokenizer's training was preempted (rerun to resume).
  """
  want = manifest.needed(config)
  names = [a.name for a in want]
  if only:
    unknown = [n for n in only if n not in manifest.BY_NAME]
    if unknown:
      raise manifest.PrepareError(f"Unknown artefact(s) {unknown}; the artefacts are "
                       f"{[a.name for a in manifest.ARTEFACTS]}.")
    unneeded = [n for n in only if n not in names]
    if unneeded:
      raise manifest.PrepareError(
          f"This config does not need {unneeded} from launch.prepare; it needs "
          f"{names or 'nothing'} (manifest.needed: FashionViL's PAC / MPFC weights, or a key "
          "set to 'prepared'; a key set to a path is your own file).")
    want = [a for a in want if a.name in only]
  status = {}
  if not want:
    return status
  identity = manifest.dataset_identity(config.data)
  entries = manifest.load(workdir)["artefacts"]
  folder = manifest.prepared_dir(workdir)
  os.makedirs(folder, exist_ok=True)
  for a in want:
    values = manifest.made_for(a.name, config)
    entry = entries.get(a.name)
    if entry is not None and not overwrite:
      problems = manifest.differences(entry, identity, values)
      if problems:
        raise manifest.ArtefactMismatchError(
            f"{manifest.manifest_path(workdir)}: {a.name!r} was made for another dataset or "
            f"config ({'; '.join(problems)}). Rerun with --overwrite to remake it for this "
            "config, or use another --workdir.")
      if os.path.exists(manifest.artefact_path(workdir, entry)):
        status[a.name] = SKIPPED
        log(f"{a.name}: up to date, made {entry['created']} "
            f"({manifest.artefact_path(workdir, entry)}); --overwrite remakes it")
        continue
    out = os.path.join(folder, a.filename)
    log(f"{a.name}: making {out} ({a.what})")
    if a.name == "attributes":
      info = attributes.make(config, out)
    elif a.name == "vq_codes":
      tokenizer_dir = os.path.join(folder, vq_codes.TOKENIZER_DIR)
      if overwrite and os.path.isdir(tokenizer_dir):
        shutil.rmtree(tokenizer_dir)
      info = vq_codes.make(config, out, tokenizer_dir=tokenizer_dir, spec=vqvae_config,
                           overrides=vqvae_overrides, batch_size=batch_size)
    else:
      info = patches.make(config, out, batch_size=batch_size, dtype=patch_dtype)
    manifest.record(workdir, a, dataset=identity, made_for_values=values, command=command,
                    config_name=config_name, options=info["options"], summary=info["summary"])
    status[a.name] = MADE
    log(f"{a.name}: {info['summary']} -> {out}")
  return status
