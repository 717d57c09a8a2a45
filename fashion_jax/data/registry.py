"""Finding a built dataset by name: the one lookup the input pipeline, the evaluators' data
checks, the downstream tasks and the contact sheet share.

A name is 'NAME[/CONFIG][:VERSION]'. fashion_jax/data/builders/NAME.py, when it exists, is
imported first: importing it registers NAME with tfds (as launch/build_data.py does). Other
names must already be registered, or be readable from data_dir's files.

TensorFlow Datasets is imported inside `prepared_builder` on purpose: train/config_check.py
imports this module (through evaluate/data_check.py), and checking a config must not import
TensorFlow.
"""

import importlib
import importlib.util
from types import ModuleType


class DatasetNotBuiltError(FileNotFoundError):
  """Dataset `name` is not built in the data dir; the message names the build command."""


def builder_module(name: str) -> ModuleType | None:
  """fashion_jax/data/builders/NAME.py for dataset `name`, imported; None if there is none."""
  module = f"fashion_jax.data.builders.{name.split('/')[0].split(':')[0]}"
  if importlib.util.find_spec(module) is None:
    return None
  return importlib.import_module(module)


def prepared_builder(name: str, data_dir: str = "", *, build_flags: str = "--data_dir=DIR"):
  """The TFDS builder of dataset `name`, built in `data_dir` ('' = tfds's default).

  Raises DatasetNotBuiltError (a FileNotFoundError) naming the dataset's build directory and
  the launch.build_data command (with `build_flags`) when the dataset is not built there.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (module docstring)
  builder_module(name)
  builder = tfds.builder(name, data_dir=data_dir or None)
  if not builder.is_prepared():
    raise DatasetNotBuiltError(
        f"Dataset {name!r} is not built (no complete build in {builder.data_dir}); build it with "
        f"`python -m launch.build_data --dataset={name} {build_flags}`.")
  return builder
