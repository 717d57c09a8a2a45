"""Config validation and trainer defaults, run before anything is compiled.

`check(config, num_devices, process_count)` raises `ConfigError` (a ValueError) whose message
names the bad key and value for: an unknown key (with the closest known key suggested), a
missing required key, a wrong type, a value outside its choices, a nonsensical optimizer value
(lr or weight_decay < 0, betas outside [0, 1), eps <= 0, clip_norm < 0; lr = 0 is a warning),
a mesh that does not divide the device count, a global batch not divisible by the batch shards
(data * fsdp), by the process count or by grad_accum_steps (and micro-batches not divisible by
data * fsdp), an evaluator type with no module, and a best_metric without any evaluator.

`check_train_features(config)` compares the features the system's loss reads (its
`required_features`, systems/base.py) with those the input makes for this config (data/
features.py `feature_spec` for the default pipeline; an input module's own `feature_spec(config)`
if it has one, else not checked). A missing one is a ConfigError naming it, what needs it and the
config key that turns it on (e.g. config.data.vq_codes, which `python -m launch.prepare` makes).
It reads no files and imports no TensorFlow; the trainer runs it right after `check`, before the
system is built.

Two checks need the data, and run after `check`, still before anything compiles:
`check_eval_data(config)` compares every evaluation with the dataset it reads (a missing split
or field, no labels, a split too small: evaluate/base.py) and drops the `optional` ones that
cannot run; `check_train_examples(config, num_examples)` refuses a global batch larger than the
train split (every batch would repeat examples: in-batch negatives become copies of the
positive).

`unknown_key_error(key, where, known)` is the "did you mean" error for an unknown key; the
entry points (fashion_jax/cli.py) use it for command-line overrides of keys that do not exist.

`with_defaults(config)` returns a copy with every trainer key present (the defaults below); the
copy is what the trainer uses and what it writes to `<workdir>/config.json`.

Top-level keys the trainer does not own are the system's: `model`, `data`, `init`, `objective`
by default, or the tuple `CONFIG_KEYS` that the system module declares
(`fashion_jax.systems.system_config_keys`). The trainer validates its own sections key by key
and leaves the system's sections to the system.
"""

from collections.abc import Mapping
import copy
import difflib
import importlib
import importlib.util
import inspect
from typing import Any, NamedTuple

from absl import logging
import ml_collections

from fashion_jax import systems
from fashion_jax.configs import ConfigError
from fashion_jax.data import features
from fashion_jax.evaluate import base as eval_base
from fashion_jax.evaluate import data_check
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.systems import base as system_base
from fashion_jax.train.optimizer import DEFAULT_PARAM_BOUNDS
from fashion_jax.train.optimizer import DEFAULT_WD_EXCLUDE


class Key(NamedTuple):
  types: tuple[type, ...]
  default: Any = None
  required: bool = False
  choices: tuple[Any, ...] | None = None


_NONE = type(None)
_NUM = (int, float)
_SEQ = (list, tuple)
_MAP = (Mapping, ml_collections.ConfigDict)

SCHEMA = {
    "system": Key((str,), required=True),
    "seed": Key((int,), 0),
    # Module exposing make_train_iterator(config, *, start_step, process_index, process_count)
    # (loop.py's input plug-in), e.g. 'fashion_jax.data.downstream' for FashionViL fine-tuning.
    "input": Key((str,), "fashion_jax.data.pipeline"),
    "batch_size": Key((int,), required=True),
    "total_steps": Key((int, _NONE), None),
    "num_epochs": Key(_NUM + (_NONE,), None),
    "grad_accum_steps": Key((int,), 1),
    "mesh": {"data": Key((int,), -1), "fsdp": Key((int,), 1), "tensor": Key((int,), 1)},
    "sharding_rules": Key(_SEQ + (_NONE,), None),
    "optimizer": {
        "name": Key((str,), "adamw", choices=("adamw",)),
        "lr": Key(_NUM, required=True),
        "b1": Key(_NUM, 0.9),
        "b2": Key(_NUM, 0.999),
        "eps": Key(_NUM, 1e-8),
        "weight_decay": Key(_NUM, 0.0),
        "clip_norm": Key(_NUM + (_NONE,), None),
        "schedule": {
            "kind": Key((str,), "cosine", choices=("cosine", "step", "constant")),
            "warmup_steps": Key((int,), 0),
            "decay_steps": Key((int, _NONE), None),
            "end_lr_factor": Key(_NUM, 0.0),
            "boundaries": Key(_SEQ, ()),
            "factor": Key(_NUM, 0.1),
        },
        "lr_mults": Key(_SEQ, ()),
        "freeze": Key(_SEQ, ()),
        "wd_exclude": Key(_SEQ, DEFAULT_WD_EXCLUDE),
        "param_bounds": Key(_SEQ, DEFAULT_PARAM_BOUNDS),
    },
    "checkpoint": {
        "every_steps": Key((int,), 1000),
        "keep": Key((int,), 2),
        "best_metric": Key((str, _NONE), None),
        "best_mode": Key((str,), "max", choices=("max", "min")),
        "async": Key((bool,), True),
    },
    "log_every_steps": Key((int,), 50),
    "evals": Key(_MAP, {}),
    "nan_policy": Key((str,), "stop", choices=("stop", "skip")),
    "profile": {"start_step": Key((int,), 0), "num_steps": Key((int,), 0)},
    "distributed": Key((bool,), False),
}

# The trainer's keys of a config.evals entry; the others are the Evaluator's keyword arguments.
# optional=True: drop the evaluation (with a logged note) when the dataset lacks what it reads.
EVAL_KEYS = {"type": Key((str,), required=True), "every": Key((int,), 0),
             "optional": Key((bool,), False)}


def _type_ok(value, types) -> bool:
  if isinstance(value, bool) and bool not in types:
    return False  # True is an int in Python; never accept it for a number.
  if float in types and isinstance(value, int):
    return True
  return isinstance(value, types)


def _initials(key: str) -> str:
  return "".join(w[0] for w in key.lower().split("_") if w)


def closest_key(key: str, known) -> str | None:
  """The known key `key` most likely meant: a case difference, a close spelling (difflib), an
  abbreviation by initials either way ('learning_rate' -> 'lr', 'wd' -> 'weight_decay'), or a
  key containing / contained in it ('warmup' -> 'warmup_steps'); None when nothing fits."""
  known = [str(k) for k in known]
  for k in known:
    if k.lower() == key.lower():
      return k
  close = difflib.get_close_matches(key, known, n=1)
  if close:
    return close[0]
  for k in known:
    if "_" in key + k and (_initials(key) == k.lower() or _initials(k) == key.lower()):
      return k
  contained = [k for k in known if len(min(k, key, key=len)) >= 3 and (k in key or key in k)]
  return min(contained, key=lambda k: abs(len(k) - len(key))) if contained else None


def unknown_key_error(key: str, where: str, known) -> ConfigError:
  """ConfigError for the unknown key `key` under the section `where` ('' or 'optimizer.'),
  suggesting the closest of the `known` keys (closest_key)."""
  close = closest_key(key, known)
  hint = f" (did you mean {close!r}?)" if close else ""
  return ConfigError(f"Unknown config key {where}{key!r}{hint}; known keys here: "
                     f"{sorted(known)}.")



def _check_section(section: Mapping[str, Any], schema: Mapping[str, Any], where: str):
  for key in section.keys():
    if key not in schema:
      raise unknown_key_error(key, where, schema)
  for key, spec in schema.items():
    name = f"config.{where}{key}"
    if isinstance(spec, dict):
      if key in section and section[key] is not None:
        if not isinstance(section[key], _MAP):
          raise ConfigError(f"{name}={section[key]!r} must be a ConfigDict/mapping.")
        _check_section(section[key], spec, f"{where}{key}.")
      continue
    if key not in section:
      if spec.required:
        raise ConfigError(f"Missing required config key {name}.")
      continue
    value = section[key]
    if not _type_ok(value, spec.types):
      names = " or ".join("None" if t is _NONE else t.__name__ for t in spec.types)
      raise ConfigError(f"{name}={value!r} has type {type(value).__name__}; expected {names}.")
    if spec.choices is not None and value not in spec.choices:
      raise ConfigError(f"{name}={value!r} is not one of {spec.choices}.")


def _fill(section, schema):
  for key, spec in schema.items():
    if isinstance(spec, dict):
      if key not in section or section[key] is None:
        section[key] = ml_collections.ConfigDict()
      _fill(section[key], spec)
    elif key not in section and not spec.required:
      section[key] = copy.deepcopy(spec.default)


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every trainer key of SCHEMA present (defaults filled in)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    _fill(config, SCHEMA)
    for spec in config.evals.values():
      if "every" not in spec:
        with spec.unlocked():
          spec.every = 0
  return config


def check_evals(evals: Mapping[str, Any]) -> None:
  """Each entry has a `type` naming an importable evaluator module and an int `every`."""
  for name, spec in evals.items():
    if not isinstance(spec, _MAP):
      raise ConfigError(f"config.evals.{name}={spec!r} must be a ConfigDict with a `type`.")
    for key in EVAL_KEYS:
      want = EVAL_KEYS[key]
      if key not in spec:
        if want.required:
          raise ConfigError(f"Missing required config key config.evals.{name}.{key}.")
      elif not _type_ok(spec[key], want.types):
        raise ConfigError(f"config.evals.{name}.{key}={spec[key]!r} has the wrong type.")
    if spec.get("every", 0) < 0:
      raise ConfigError(f"config.evals.{name}.every={spec['every']} must be >= 0.")
    module = eval_base.module_name(spec["type"])
    if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None or \
        importlib.util.find_spec(module) is None:
      raise ConfigError(f"config.evals.{name}.type={spec['type']!r}: there is no evaluator "
                        f"module {module}.")


def check_eval_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every evaluation against its Evaluator and the dataset; returns the evals to run.

  For each config.evals entry: its keyword arguments must be arguments of the Evaluator's
  constructor, and each `data_needs` of the Evaluator class (evaluate/base.py) must be met by
  config.data's dataset (evaluate/data_check.py). Evaluator classes without `data_needs` (or a
  config without `data`) are not checked against data.

  Returns:
    A copy of `config` without the `optional` evaluations that cannot run (each named in a
    logged warning with the reason); the same config when nothing is dropped.

  Raises:
    ConfigError naming the evaluation, its split and what the dataset has (its splits, fields or
    size), for an evaluation that is not optional.
  """
  dropped = []
  for name, spec in (config.get("evals") or {}).items():
    module = importlib.import_module(eval_base.module_name(spec["type"]))
    evaluator = getattr(module, "Evaluator", None)
    if evaluator is None:
      raise ConfigError(f"config.evals.{name}.type={spec['type']!r}: module {module.__name__} "
                        "defines no `Evaluator` class.")
    kwargs = eval_base.evaluator_kwargs(spec)
    if not inspect.isclass(evaluator):  # A factory: its arguments are its own business.
      continue
    try:
      eval_base.arguments(evaluator, kwargs)
    except TypeError as e:
      params = [p for p in inspect.signature(evaluator.__init__).parameters
                if p not in ("self", "system", "config", "mesh")]
      unknown = [k for k in kwargs if k not in params]
      if not unknown:
        raise ConfigError(f"config.evals.{name}: {e}") from e
      raise unknown_key_error(unknown[0], f"evals.{name}.", params + list(EVAL_KEYS)) from e
    needs_fn = getattr(evaluator, "data_needs", None)
    if needs_fn is None or "data" not in config:
      continue
    for need in needs_fn(**kwargs):
      problem = data_check.problem(config.data, need)
      where = f"config.evals.{name} (type {spec['type']!r}, {need.arg}={need.split!r})"
      if problem is None:
        note = data_check.warning(config.data, need)
        if note:
          logging.warning("%s: %s.", where, note)
        continue
      if spec.get("optional", False):
        logging.warning("Skipping %s: %s. It is optional, so training goes on without it.",
                        where, problem)
        dropped.append(name)
        break
      fix = (f"point config.evals.{name}.{need.arg} at one of them"
             if not data_check.split_exists(config.data, need.split)
             else f"change config.evals.{name}'s split or field")
      raise ConfigError(
          f"{where} cannot run: {problem}. To run it, {fix}; to skip it on datasets that cannot "
          f"serve it, set config.evals.{name}.optional=True.")
  if not dropped:
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    config.evals = ml_collections.ConfigDict(
        {k: v for k, v in config.evals.items() if k not in dropped})
  return config


def train_feature_spec(config: ml_collections.ConfigDict) -> dict[str, features.Spec] | None:
  """The features a train batch of `config` holds (name -> Spec), or None when unknown.

  The default input (data/pipeline.py): features.feature_spec, from the config alone. Another
  config.input module: its `feature_spec(config)` if it defines one, else None.
  """
  module_name = config.get("input") or SCHEMA["input"].default
  if module_name == SCHEMA["input"].default:
    spec_fn = features.feature_spec
  else:
    spec_fn = getattr(importlib.import_module(module_name), "feature_spec", None)
    if spec_fn is None:
      return None
  try:
    return spec_fn(config)
  except (ValueError, KeyError, AttributeError) as e:
    raise ConfigError(f"config.data cannot make a train batch: {e}") from e


def check_train_features(config: ml_collections.ConfigDict) -> None:
  """Refuses a config whose input does not make a feature the system's loss reads.

  Raises:
    ConfigError naming each missing feature, what needs it, and the config key that turns it
    on (module docstring). Systems without `required_features`, and inputs whose features are
    unknown (train_feature_spec is None), are not checked.
  """
  need = system_base.required_features(systems.get_module(config.system).System, config)
  if not need:
    return
  spec = train_feature_spec(config)
  if spec is None:
    return
  missing = [name for name in need if name not in spec]
  if not missing:
    return
  default_input = (config.get("input") or SCHEMA["input"].default) == SCHEMA["input"].default
  how = features.catalog(config.data) if default_input else {}
  problems = []
  for name in missing:
    who = need[name] or "its loss"
    if how.get(name):
      fix = f"set {how[name]}"
    elif default_input:
      fix = "no feature op of data/features.py makes it (declare one there)"
    else:
      fix = f"the input module {config.input} does not make it"
    problems.append(f"{who} needs the batch feature {name!r}: {fix}")
  raise ConfigError(
      f"config.system={config.system!r} cannot train on config.input="
      f"{config.get('input') or SCHEMA['input'].default!r}: " + "; ".join(problems) +
      f". The batch has {sorted(spec)}.")


def check_train_examples(config: ml_collections.ConfigDict, num_examples: int | None) -> None:
  """Refuses a global batch larger than the train split (`num_examples`: one epoch over all
  processes, the train iterator's `.num_examples`; None = unknown, not checked)."""
  if num_examples is None:
    return
  if num_examples < config.batch_size:
    data = config.get("data") or {}
    split = f" ({data.get('name')}:{data.get('train_split')})" if "name" in data else ""
    raise ConfigError(
        f"config.batch_size={config.batch_size} is larger than the train split{split}, which "
        f"has {num_examples} example(s): every batch would hold the same examples several "
        f"times (in-batch negatives would be copies of the positive). Set config.batch_size "
        f"<= {num_examples} or train on more data.")


def input_factory(module_name: str):
  """config.input -> its make_train_iterator; ConfigError naming a missing module / function."""
  try:
    found = importlib.util.find_spec(module_name) is not None
  except (ImportError, ValueError):
    found = False
  if not found:
    raise ConfigError(f"config.input={module_name!r}: there is no module {module_name}.")
  factory = getattr(importlib.import_module(module_name), "make_train_iterator", None)
  if not callable(factory):
    raise ConfigError(f"config.input={module_name!r}: module {module_name} has no "
                      "make_train_iterator(config, *, start_step, process_index, "
                      "process_count).")
  return factory


def _check_optimizer_values(opt: Mapping[str, Any]) -> None:
  """Optimizer values that train but make no sense (their types are checked already)."""
  lr = opt.get("lr")
  if lr is not None and lr < 0:
    raise ConfigError(f"config.optimizer.lr={lr} must be > 0 (a negative learning rate ascends "
                      "the loss).")
  if lr == 0:
    logging.warning("config.optimizer.lr=0: the parameters will not change.")
  if opt.get("weight_decay", 0.0) < 0:
    raise ConfigError(f"config.optimizer.weight_decay={opt['weight_decay']} must be >= 0 (a "
                      "negative decay inflates the weights).")
  for key in ("b1", "b2"):
    if key in opt and not 0 <= opt[key] < 1:
      raise ConfigError(f"config.optimizer.{key}={opt[key]} must lie in [0, 1).")
  if "eps" in opt and opt["eps"] <= 0:
    raise ConfigError(f"config.optimizer.eps={opt['eps']} must be > 0.")
  if opt.get("clip_norm") is not None and opt["clip_norm"] < 0:
    raise ConfigError(f"config.optimizer.clip_norm={opt['clip_norm']} must be >= 0 (None or 0 "
                      "= no clipping).")
  schedule = opt.get("schedule") or {}
  if schedule.get("end_lr_factor", 0.0) < 0:
    raise ConfigError(f"config.optimizer.schedule.end_lr_factor={schedule['end_lr_factor']} "
                      "must be >= 0.")


def check(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1
          ) -> dict[str, int]:
  """Validates `config` (see the module docstring); returns the resolved mesh shape.

  Args:
    config: the experiment config (with or without defaults filled).
    num_devices: global device count.
    process_count: number of JAX processes.

  Raises:
    ConfigError naming the bad key/value.
  """
  if "system" not in config:
    raise ConfigError("Missing required config key config.system.")
  if not isinstance(config.system, str):
    raise ConfigError(f"config.system={config.system!r} must be a str.")
  system_keys = systems.system_config_keys(config.system)
  top_schema = dict(SCHEMA)
  for key in config.keys():
    if key not in top_schema and key not in system_keys:
      raise unknown_key_error(key, "", set(top_schema) | set(system_keys))
  _check_section({k: v for k, v in config.items() if k in top_schema}, top_schema, "")

  for key in ("batch_size", "grad_accum_steps", "log_every_steps"):
    if key in config and config[key] < 1:
      raise ConfigError(f"config.{key}={config[key]} must be >= 1.")
  if config.get("total_steps") is None and config.get("num_epochs") is None:
    raise ConfigError("Missing required config key: set config.total_steps or config.num_epochs.")
  if config.get("total_steps") is not None and config.get("num_epochs") is not None:
    raise ConfigError(f"Both config.total_steps={config.total_steps} and config.num_epochs="
                      f"{config.num_epochs} are set; set one.")
  if config.get("total_steps") is not None and config.total_steps < 1:
    raise ConfigError(f"config.total_steps={config.total_steps} must be >= 1.")
  _check_optimizer_values(config.get("optimizer") or {})
  schedule = (config.get("optimizer") or {}).get("schedule") or {}
  warmup = schedule.get("warmup_steps", 0)
  if config.get("total_steps") is not None and not 0 <= warmup <= config.total_steps:
    raise ConfigError(f"config.optimizer.schedule.warmup_steps={warmup} must lie in [0, "
                      f"total_steps={config.total_steps}].")
  ckpt = config.get("checkpoint") or {}
  if ckpt.get("every_steps", 1) < 1 or ckpt.get("keep", 1) < 1:
    raise ConfigError(f"config.checkpoint.every_steps={ckpt.get('every_steps')} and "
                      f"config.checkpoint.keep={ckpt.get('keep')} must be >= 1.")
  input_factory(config.get("input", SCHEMA["input"].default))
  evals = config.get("evals") or {}
  check_evals(evals)
  if ckpt.get("best_metric") and not evals:
    raise ConfigError(f"config.checkpoint.best_metric={ckpt['best_metric']!r} but config.evals "
                      f"is empty: nothing computes it.")

  try:
    shape = mesh_lib.mesh_shape(config.get("mesh") or {}, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  shards = shape["data"] * shape["fsdp"]
  batch = config.batch_size
  accum = config.get("grad_accum_steps", 1)
  if batch % shards:
    raise ConfigError(f"config.batch_size={batch} is not divisible by the batch axes data*fsdp "
                      f"= {shape['data']}*{shape['fsdp']} = {shards}.")
  if batch % process_count:
    raise ConfigError(f"config.batch_size={batch} is not divisible by the process count "
                      f"{process_count}.")
  if batch % accum or (batch // accum) % shards:
    raise ConfigError(f"config.batch_size={batch} is not divisible by grad_accum_steps={accum} "
                      f"into micro-batches divisible by data*fsdp={shards}.")
  return shape
