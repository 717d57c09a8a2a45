"""System registry: `config.system` names a module that defines `System(config)`.

`config.system = 'fashionclip'` imports `fashion_jax.systems.fashionclip`; a dotted name
(`'tests.toy_system'`, `'mypackage.my_system'`) is imported as a full module path, so systems
may live outside the package. A system module may declare `CONFIG_KEYS`, the top-level config
sections it owns (default `DEFAULT_CONFIG_KEYS`); the trainer rejects other unknown top-level
keys.

`System(config)` is built from the config alone (and the files it names), so a ValueError from
it is a config value the system cannot run with: get_system raises it as configs.ConfigError
naming the system (launch.train prints one line for those).
"""

import importlib
import importlib.util
from types import ModuleType
from typing import Any

from fashion_jax import configs

DEFAULT_CONFIG_KEYS = ("model", "data", "init", "objective")


def module_name(name: str) -> str:
  return name if "." in name else f"fashion_jax.systems.{name}"


def get_module(name: str) -> ModuleType:
  """Imports the system module; ValueError naming `name` when it does not exist."""
  full = module_name(name)
  parent = full.rsplit(".", 1)[0]
  if importlib.util.find_spec(parent) is None or importlib.util.find_spec(full) is None:
    raise ValueError(f"config.system={name!r}: there is no system module {full}.")
  module = importlib.import_module(full)
  if not hasattr(module, "System"):
    raise ValueError(f"config.system={name!r}: module {full} defines no `System` class.")
  return module


def system_config_keys(name: str) -> tuple[str, ...]:
  """Top-level config sections owned by the system `name`."""
  return tuple(getattr(get_module(name), "CONFIG_KEYS", DEFAULT_CONFIG_KEYS))


def get_system(config: Any):
  """`System(config)` of the module named by `config.system` (module docstring: errors)."""
  system_cls = get_module(config.system).System
  try:
    return system_cls(config)
  except configs.ConfigError:
    raise
  except ValueError as e:
    raise configs.ConfigError(f"config.system={config.system!r}: {e}") from e
