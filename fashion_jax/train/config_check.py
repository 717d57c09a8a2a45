"""Config validation and trainer defaults, run before anything is compiled.

`check(config, num_devices, process_count)` raises `ConfigError` (a ValueError) whose message
names the bad key and value for: an unknown key (with the closest known key suggested), a
missing required key, a wrong type, a value outside its choices, a mesh that does not divide the
device count, a global batch not divisible by the batch shards (data * fsdp), by the process
count or by grad_accum_steps (and micro-batches not divisible by data * fsdp), an evaluator type
with no module, and a best_metric without any evaluator.

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
from typing import Any, NamedTuple

import ml_collections

from fashion_jax import systems
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.train.optimizer import DEFAULT_WD_EXCLUDE


class ConfigError(ValueError):
  """A config value the trainer cannot run with."""


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

EVAL_KEYS = {"type": Key((str,), required=True), "every": Key((int,), 0)}


def _type_ok(value, types) -> bool:
  if isinstance(value, bool) and bool not in types:
    return False  # True is an int in Python; never accept it for a number.
  if float in types and isinstance(value, int):
    return True
  return isinstance(value, types)


def _unknown(key: str, where: str, known) -> ConfigError:
  close = difflib.get_close_matches(key, list(known), n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ConfigError(f"Unknown config key {where}{key!r}{hint}; known keys here: "
                     f"{sorted(known)}.")


def _check_section(section: Mapping[str, Any], schema: Mapping[str, Any], where: str):
  for key in section.keys():
    if key not in schema:
      raise _unknown(key, where, schema)
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
    for key in ("type", "every"):
      want = EVAL_KEYS[key]
      if key not in spec:
        if want.required:
          raise ConfigError(f"Missing required config key config.evals.{name}.{key}.")
      elif not _type_ok(spec[key], want.types):
        raise ConfigError(f"config.evals.{name}.{key}={spec[key]!r} has the wrong type.")
    if spec.get("every", 0) < 0:
      raise ConfigError(f"config.evals.{name}.every={spec['every']} must be >= 0.")
    module = evaluator_module_name(spec["type"])
    if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None or \
        importlib.util.find_spec(module) is None:
      raise ConfigError(f"config.evals.{name}.type={spec['type']!r}: there is no evaluator "
                        f"module {module}.")


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


def evaluator_module_name(eval_type: str) -> str:
  """'retrieval' -> 'fashion_jax.evaluate.retrieval'; a dotted name is a full module path."""
  return eval_type if "." in eval_type else f"fashion_jax.evaluate.{eval_type}"


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
      raise _unknown(key, "", set(top_schema) | set(system_keys))
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
