"""Which derived artefacts a config needs, and where a workdir records them.

Some systems read files derived from the dataset before training. `python -m launch.prepare`
makes them into `<workdir>/prepared/` and records each in `<workdir>/prepared/manifest.json`;
`launch.train` and `launch.evaluate`, given the same --config and --workdir, call
`apply(config, workdir)`, which fills the config keys from the manifest.

  artefact        config key           file                 needed when (`needed`)
  attributes      data.attributes      attributes.txt       system 'fashionvil' with
                                                            objective.tasks.pac > 0
  vq_codes        data.vq_codes        vq_codes.npz         system 'fashionvil' with
                                       (+ vqvae/: the       objective.tasks.mpfc > 0
                                       tokenizer's run)
  patch_features  data.patch_features  patch_features.npz   the key is 'prepared' (FashionBERT's
                                                            cached features are opt-in)

Any of the three keys set to 'prepared' asks for its artefact. A key set to any other non-empty
value is the user's own file and is left as it is (nothing is needed from the manifest for it);
'' means "from the manifest" when the config needs the artefact, else off.

Manifest (JSON): {"format": 1, "artefacts": {NAME: entry}}, each entry:
  name, config_key, path (relative to <workdir>/prepared), created (UTC, ISO 8601),
  dataset    {name, data_dir (the built version's folder), version, splits {split: examples},
              catalog_fingerprint (sha256 of the build's catalog_fingerprint.json, own catalogs
              built by image_text_folder; else None)}: `dataset_identity`;
  made_for   {config key: value}: the other config values the artefact depends on (`made_for`,
              e.g. data.image_size and data.patch_mask.grid for VQ codes);
  command, config (the --config argument), options (the maker's own), summary.
`apply` refuses (ArtefactMismatchError) an entry whose dataset or made_for differ from the
config's, naming each difference and the `launch.prepare ... --overwrite` command; a needed
artefact without an entry or file is MissingArtefactError naming the launch.prepare command.
Both are PrepareErrors (ValueErrors). `apply` only reads: the workdir may belong to a running
process.
"""

import copy
import datetime
import hashlib
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections

from fashion_jax.data import pipeline
from fashion_jax.data.builders import image_text_folder

FORMAT = 1
DIRNAME = "prepared"
FILENAME = "manifest.json"
PREPARED = "prepared"  # A config key's value that asks for its prepared artefact.


class Artefact(NamedTuple):
  name: str
  config_key: str   # Dotted, e.g. 'data.attributes'.
  filename: str     # Under <workdir>/prepared/.
  what: str         # For messages.


ARTEFACTS = (
    Artefact("attributes", "data.attributes", "attributes.txt",
             "the pseudo-attribute vocabulary of FashionViL's PAC task"),
    Artefact("vq_codes", "data.vq_codes", "vq_codes.npz",
             "the VQ tokenizer's codes of every train view (FashionViL's MPFC targets)"),
    Artefact("patch_features", "data.patch_features", "patch_features.npz",
             "FashionBERT's frozen patch features of every train view"),
)
BY_NAME = {a.name: a for a in ARTEFACTS}
_FASHIONVIL_TASK = {"attributes": "pac", "vq_codes": "mpfc"}


class PrepareError(ValueError):
  """A config, dataset or workdir the prepare step cannot serve (the message says why)."""


class MissingArtefactError(PrepareError):
  """A needed artefact is not in the manifest (or its file is gone)."""


class ArtefactMismatchError(PrepareError):
  """The manifest's artefact was made for another dataset or config."""


def _get(config: Any, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return None
    node = node[part]
  return node


def _json(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=str))


def reason(config: Any, artefact: Artefact) -> str | None:
  """Why `config` reads `artefact` ('objective.tasks.pac=0.15 > 0'), or None when it does not."""
  value = _get(config, artefact.config_key)
  if value is None:
    return None  # The config has no such key.
  if value == PREPARED:
    return f"{artefact.config_key}={PREPARED!r}"
  task = _FASHIONVIL_TASK.get(artefact.name)
  if task and config.get("system") == "fashionvil":
    weight = float(_get(config, f"objective.tasks.{task}") or 0.0)
    if weight > 0:
      return f"objective.tasks.{task}={weight:g} > 0"
  return None


def needed(config: Any) -> list[Artefact]:
  """The artefacts `config` reads and expects from the manifest (its key is '' or 'prepared').

  FashionViL: attributes when objective.tasks.pac > 0, vq_codes when objective.tasks.mpfc > 0;
  any config: each artefact whose key is 'prepared'. Nothing for the others. A key set to a
  path is the user's own file: not needed from the manifest.
  """
  return [a for a in ARTEFACTS
          if reason(config, a) and _get(config, a.config_key) in ("", PREPARED)]


def made_for(name: str, config: Any) -> dict[str, Any]:
  """The config values (besides the dataset) the artefact `name` depends on."""
  data = config.data
  if name == "attributes":
    return {"data.train_split": data.get("train_split", "train"),
            "data.text_fields": _json(tuple(data.text_fields))}
  if name == "vq_codes":
    return {"data.train_split": data.get("train_split", "train"),
            "data.image_size": int(data.image_size),
            "data.patch_mask.grid": int(data.patch_mask.grid),
            "model.num_codes": int(config.model.num_codes)}
  if name == "patch_features":
    out = {"data.train_split": data.get("train_split", "train"),
           "data.image_size": int(data.image_size), "model.grid": int(config.model.grid),
           "model.cnn_variant": config.model.get("cnn_variant", ""),
           "init.hf_resnet_dir": (config.get("init") or {}).get("hf_resnet_dir", "")}
    if out["model.cnn_variant"] != "pixels" and not out["init.hf_resnet_dir"]:
      out["seed"] = int(config.seed)  # A randomly initialised CNN depends on the seed.
    return out
  raise KeyError(f"Unknown artefact {name!r}; the artefacts are {sorted(BY_NAME)}.")


def dataset_identity(data: Any) -> dict[str, Any]:
  """{name, data_dir, version, splits, catalog_fingerprint} of config.data's built dataset."""
  builder = pipeline._builder(data)  # pylint: disable=protected-access
  folder = os.path.abspath(os.fspath(builder.data_dir))
  fingerprint = None
  path = os.path.join(folder, image_text_folder.FINGERPRINT_FILENAME)
  if os.path.exists(path):
    with open(path, "rb") as f:
      fingerprint = hashlib.sha256(f.read()).hexdigest()
  return {"name": data.name, "data_dir": folder, "version": str(builder.info.version),
          "splits": {k: int(v.num_examples) for k, v in sorted(builder.info.splits.items())},
          "catalog_fingerprint": fingerprint}


# ------------------------------------------------------------------------------------------------
# The manifest file.
# ------------------------------------------------------------------------------------------------


def prepared_dir(workdir: str) -> str:
  return os.path.join(workdir, DIRNAME)


def manifest_path(workdir: str) -> str:
  return os.path.join(prepared_dir(workdir), FILENAME)


def load(workdir: str) -> dict[str, Any]:
  """The manifest of `workdir` ({'format', 'artefacts'}; no artefacts when there is none).

  Raises PrepareError naming the file when it is not a manifest this code reads.
  """
  path = manifest_path(workdir)
  if not os.path.exists(path):
    return {"format": FORMAT, "artefacts": {}}
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise PrepareError(f"{path} is not a readable manifest ({type(e).__name__}: {e}); remake it "
                     "with launch.prepare ... --overwrite.") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise PrepareError(f"{path} is not a format-{FORMAT} manifest; remake it with launch.prepare "
                     "... --overwrite.")
  manifest.setdefault("artefacts", {})
  return manifest


def artefact_path(workdir: str, entry: Mapping[str, Any]) -> str:
  """The absolute path of an entry's file."""
  return os.path.abspath(os.path.join(prepared_dir(workdir), entry["path"]))


def record(workdir: str, artefact: Artefact, *, dataset: Mapping[str, Any],
           made_for_values: Mapping[str, Any], command: str = "", config_name: str = "",
           options: Mapping[str, Any] | None = None, summary: str = "") -> dict[str, Any]:
  """Adds (or replaces) the entry of `artefact` in the manifest (atomically); returns it."""
  manifest = load(workdir)
  entry = {"name": artefact.name, "config_key": artefact.config_key, "path": artefact.filename,
           "dataset": _json(dict(dataset)), "made_for": _json(dict(made_for_values)),
           "command": command, "config": config_name, "options": _json(dict(options or {})),
           "summary": summary,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  manifest["artefacts"][artefact.name] = entry
  os.makedirs(prepared_dir(workdir), exist_ok=True)
  path = manifest_path(workdir)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  return entry


def differences(entry: Mapping[str, Any], dataset: Mapping[str, Any],
                made_for_values: Mapping[str, Any]) -> list[str]:
  """'key: A there, B here' for each dataset or made_for value that differs from the entry's."""
  out = []
  for section, here in (("dataset", _json(dict(dataset))),
                        ("made_for", _json(dict(made_for_values)))):
    there = entry.get(section) or {}
    for key in sorted(set(there) | set(here)):
      if there.get(key) != here.get(key):
        label = f"dataset {key}" if section == "dataset" else key
        out.append(f"{label}: {there.get(key)!r} there, {here.get(key)!r} here")
  return out


# ------------------------------------------------------------------------------------------------
# Filling a config.
# ------------------------------------------------------------------------------------------------


def prepare_command(argv: Sequence[str], workdir: str = "") -> str:
  """`python -m launch.prepare` with the --config (and overrides) and --workdir of `argv`.

  `argv` is a launch command line (sys.argv: program first); other flags are left out. Without
  a --workdir in argv, `workdir` is used.
  """
  kept, take_next, has_workdir = [], False, False
  for arg in argv[1:]:
    if take_next:
      kept.append(arg)
      take_next = False
      continue
    name = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("-") and (name == "config" or name.startswith("config.") or
                                name == "workdir"):
      kept.append(arg)
      has_workdir |= name == "workdir"
      take_next = "=" not in arg and name in ("config", "workdir")
  if not has_workdir and workdir:
    kept.append(f"--workdir={workdir}")
  return "python -m launch.prepare " + " ".join(shlex.quote(a) for a in kept)


def _default_command(workdir: str) -> str:
  return f"python -m launch.prepare --config=CONFIG --workdir={shlex.quote(workdir)}"


def apply(config: ml_collections.ConfigDict, workdir: str, *, command: str = ""
          ) -> ml_collections.ConfigDict:
  """`config` with the keys of its needed artefacts (`needed`) filled from the manifest.

  Returns `config` itself when it needs nothing, else a copy whose keys hold the artefacts'
  absolute paths. `command` is the launch.prepare command to name in errors (`prepare_command`;
  default: a generic one with this workdir).

  Raises:
    MissingArtefactError: a needed artefact has no entry or its file is gone; names each one,
      why the config needs it, the command that makes it and the key to set instead.
    ArtefactMismatchError: an entry was made for another dataset or config (module docstring).
  """
  want = needed(config)
  if not want:
    return config
  command = command or _default_command(workdir)
  path = manifest_path(workdir)
  entries = load(workdir)["artefacts"]
  missing = []
  for a in want:
    entry = entries.get(a.name)
    if entry is None:
      where = (f"{path} does not exist" if not os.path.exists(path) else
               f"{path} lists no {a.name!r} (it has {sorted(entries)})")
    elif not os.path.exists(artefact_path(workdir, entry)):
      where = f"{path} lists {a.name!r} at {artefact_path(workdir, entry)}, which is gone"
    else:
      continue
    missing.append(f"{a.config_key} ({a.what}; needed since {reason(config, a)}): {where}")
  if missing:
    keys = ", ".join(f"--config.{a.config_key}=PATH" for a in want)
    off = [f"--config.objective.tasks.{_FASHIONVIL_TASK[a.name]}=0" for a in want
           if reason(config, a).startswith("objective.tasks.")]
    raise MissingArtefactError(
        f"This config needs prepared artefacts that {workdir} lacks: " + "; ".join(missing) +
        f". Make them first with:  {command}  (then rerun this command), or give files of your "
        f"own with {keys}" + (f", or train without them ({' '.join(off)})" if off else "") + ".")
  identity = dataset_identity(config.data)
  out = copy.deepcopy(config)
  for a in want:
    entry = entries[a.name]
    problems = differences(entry, identity, made_for(a.name, config))
    if problems:
      raise ArtefactMismatchError(
          f"{path}: {a.name!r} was made for another dataset or config ({'; '.join(problems)}). "
          f"Remake it for this config with:  {command} --overwrite  (or use another --workdir).")
    section, leaf = a.config_key.rsplit(".", 1)
    node = _get(out, section)
    with out.unlocked():
      node[leaf] = artefact_path(workdir, entry)
  return out
