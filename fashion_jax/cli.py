"""Command-line plumbing shared by the entry points (launch/, experiments/) taking --config.

`run(main)` is `absl.app.run(main)` where a `--config.KEY=VALUE` override of a key that does not
exist in the config ends in ONE line and exit status 1, like absl's other flag errors:

  FATAL Flags parsing error: --config.optimizer.learning_rate=0.1: Unknown config key
  optimizer.'learning_rate' (did you mean 'lr'?); known keys here: ['b1', 'b2', ...].

(printed as one line). Without it ml_collections' config_flags fails inside flag parsing with a
bare AttributeError and a 55-line traceback. The message is config_check.unknown_key_error's,
the one the trainer gives for an unknown key in a config file. Any other failure while parsing
flags is left to absl as it is.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
import re
import sys

from absl import app
from absl import flags

from fashion_jax import configs
from fashion_jax.train import config_check


def _overrides(argv: Sequence[str], name: str) -> list[tuple[str, str]]:
  """(dotted key path, the argument as written) of each `--name.PATH[=VALUE]` in argv."""
  out = []
  for arg in argv[1:]:
    if arg == "--":
      break
    m = re.match(rf"^--?{re.escape(name)}\.([^=\s]+)(=.*)?$", arg)
    if m:
      out.append((m.group(1), arg))
  return out


def _config_argument(argv: Sequence[str], name: str) -> str | None:
  """The FILE[:ARG] given as `--name=FILE[:ARG]` or `--name FILE[:ARG]`, else None."""
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    m = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
    if m:
      if m.group(1):
        return m.group(2)
      return argv[i + 1] if i + 1 < len(argv) else None
  return None


def unknown_key(config: Mapping, path: str) -> str | None:
  """Why the dotted `path` is not a key of `config` (the did-you-mean message), or None."""
  node, where = config, ""
  for part in path.split("."):
    if not isinstance(node, Mapping) and not hasattr(node, "keys"):
      return (f"config.{where[:-1]}={node!r} is a {type(node).__name__}, not a section: it has "
              f"no key {part!r}.")
    if part not in node:
      return str(config_check.unknown_key_error(part, where, list(node.keys())))
    node, where = node[part], f"{where}{part}."
  return None


def explain_override_error(argv: Sequence[str], name: str = "config") -> str | None:
  """One line naming the first `--name.*` override of argv whose key does not exist, or None."""
  overrides = _overrides(argv, name)
  argument = _config_argument(argv, name)
  if not overrides or argument is None:
    return None
  try:
    config = flags.FLAGS[name].parser.parse(argument)
  except Exception:  # pylint: disable=broad-except
    return None  # The config file itself fails: absl's report of that error stands.
  for path, arg in overrides:
    problem = unknown_key(config, path)
    if problem is not None:
      return f"{arg}: {problem}"
  return None


def resolve_config_files(argv: Sequence[str], config_flags: Sequence[str] = ("config",)
                         ) -> list[str]:
  """argv with each `--NAME=FILE[:ARG]` of `config_flags` resolved by configs.resolve_file
  (an installed config by name or by `configs/X.py` from any working directory); a config file
  that does not exist exits 1 with one line naming it (ml_collections' own report is a
  60-line traceback ending in "Failed loading config file config_config")."""
  argv = list(argv)
  for name in config_flags:
    for i, arg in enumerate(argv[1:], 1):
      if arg == "--":
        break
      m = re.match(rf"^(--?{re.escape(name)})(=(.*))?$", arg)
      if not m:
        continue
      j, value = (i, m.group(3)) if m.group(2) else (i + 1, argv[i + 1] if i + 1 < len(argv)
                                                      else None)
      if value is None:
        break
      try:
        resolved = configs.resolve_file(value)
      except FileNotFoundError as e:
        sys.stderr.write(f"FATAL Flags parsing error: {arg}: {e}\n")
        sys.exit(1)
      argv[j] = f"{m.group(1)}={resolved}" if j == i else resolved
      break
  return argv


def parse_flags(argv: Sequence[str], config_flags: Sequence[str] = ("config",)) -> list[str]:
  """absl's flag parsing; an override of a nonexistent config key exits 1 with one line.

  Config files are resolved first (`resolve_config_files`)."""
  argv = resolve_config_files(argv, config_flags)
  try:
    return app.parse_flags_with_usage(argv)
  except Exception:  # pylint: disable=broad-except
    for name in config_flags:
      message = explain_override_error(argv, name)
      if message is not None:
        sys.stderr.write(f"FATAL Flags parsing error: {' '.join(message.split())}\n")
        sys.exit(1)
    raise


def run(main: Callable[[list[str]], None], config_flags: Sequence[str] = ("config",)) -> None:
  """absl.app.run(main) with `parse_flags` (module docstring)."""
  app.run(main, flags_parser=functools.partial(parse_flags, config_flags=config_flags))


def one_line_exit(program: str, error: BaseException) -> SystemExit:
  """SystemExit whose message is `program: error` on one line (whitespace runs collapsed): an
  entry point raises it for an error the user fixes (a bad value, a missing file), so the
  command ends with that line and exit status 1 instead of a traceback."""
  return SystemExit(f"{program}: " + " ".join(str(error).split()))
