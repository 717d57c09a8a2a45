"""Every experiment config by name: `configs.get("fashionclip:smoke")`.

The config files live in the top-level `configs` package (shipped by `pip install` beside
`fashion_jax`). A spec is `NAME[:ARG]` (a module of that package) or `PATH.py[:ARG]` (any file,
as on the command line: `--config=configs/fashionclip.py:smoke`); ARG goes to `get_config(arg)`.
Overrides are `dotted.key=VALUE` strings, VALUE a Python literal or else a bare string, applied
in order; a parent section the config does not have raises `ConfigError` with a "did you mean"
(a new leaf is allowed here: `config_check.check` judges every key before anything compiles).
"""

import ast
from collections.abc import Iterable
import difflib
import importlib
import importlib.util
import os
import pkgutil

import ml_collections

import configs as configs_pkg


class ConfigError(ValueError):
  """A config value the trainer cannot run with (raised here and by train/config_check.py)."""


def names() -> list[str]:
  """The config modules of the `configs` package (e.g. 'fashionclip', 'e2')."""
  return sorted(m.name for m in pkgutil.iter_modules(configs_pkg.__path__)
                if not m.name.startswith("_") and m.name != "common")


def _module(name_or_path: str):
  if name_or_path.endswith(".py"):
    if not os.path.isfile(name_or_path):
      raise FileNotFoundError(f"No config file {name_or_path!r}.")
    spec = importlib.util.spec_from_file_location(
        "_fashion_jax_config_" + os.path.basename(name_or_path)[:-3], name_or_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  if name_or_path not in names():
    raise ConfigError(
        f"No config named {name_or_path!r}; the configs are {names()} (or pass a .py path).")
  return importlib.import_module(f"configs.{name_or_path}")


def resolve_file(spec: str) -> str:
  """The config FILE[:ARG] a command line means, as a path that exists.

  `--config=configs/fashionclip.py:base` is relative to the working directory, so it names a file
  only when the command runs from a checkout's root. Run from anywhere else (a user's own
  project, a pod's home directory), a path whose file is missing but whose name is one of the
  installed `configs` package's modules (`configs/e2.py`, `e2.py`) or a bare config name
  (`e2:smoke`) means that module's file. Anything else raises FileNotFoundError naming the path,
  the working directory and the configs there are.
  """
  path, colon, arg = spec.partition(":")
  if os.path.isfile(path):
    return spec
  stem = os.path.basename(path)[:-3] if path.endswith(".py") else path
  if stem in names() and (not path.endswith(".py") or
                          os.path.dirname(os.path.normpath(path)) in ("", "configs")):
    return os.path.join(configs_pkg.__path__[0], stem + ".py") + colon + arg
  raise FileNotFoundError(
      f"No config file {path!r} (relative to the working directory {os.getcwd()!r}); "
      f"pass an existing .py path or one of the installed configs {names()} by name, e.g. "
      f"--config={names()[0] if names() else 'NAME'}:smoke or --config=configs/NAME.py:ARG.")


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Sets `dotted.key=VALUE` in place (VALUE parsed as a Python literal, else a string)."""
  key, eq, value = item.partition("=")
  if not eq:
    raise ValueError(f"Override {item!r} is not KEY=VALUE.")
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass  # A bare string.
  node = config
  parts = key.split(".")
  for i, p in enumerate(parts[:-1]):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if p not in keys:
      close = difflib.get_close_matches(p, keys, n=1)
      hint = f" (did you mean {'.'.join(parts[:i] + [close[0]])!r}?)" if close else ""
      raise ConfigError(f"Override {item!r}: unknown config key "
                                     f"{'.'.join(parts[:i + 1])!r}{hint}.")
    node = node[p]
  leaf = parts[-1]
  with node.unlocked():
    node[leaf] = value


def get(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """The config of `spec` ('name[:arg]' or 'path.py[:arg]') with `overrides` applied."""
  name, _, arg = spec.partition(":")
  module = _module(name)
  config = module.get_config(arg) if arg else module.get_config()
  for item in overrides:
    apply_override(config, item)
  return config
