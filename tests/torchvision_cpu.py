"""Imports open_clip (and timm) for reference tests without a working torchvision (test-only).

Why: open_clip and timm import torchvision at module import time (PIL transforms, dataset
classes, FrozenBatchNorm2d), but the model code our parity tests run (open_clip's CLIP/CustomText
towers, timm's VisionTransformer) never touches it. The package index carries only CUDA builds of
torchvision; next to torch 2.13.0+cpu their `_C.so` cannot load (it links libtorch_cuda.so), and
then `import torchvision` itself fails (`RuntimeError: operator torchvision::nms does not exist`).
Worse, transformers imports torchvision whenever it is installed (transformers/image_utils.py), so
an installed-but-broken torchvision breaks `from transformers import CLIPModel` in every process.
So torchvision stays uninstalled (open-clip-torch and timm are installed with --no-deps), and
`import_open_clip()` serves `torchvision` and its submodules from placeholder modules for the
duration of the `import open_clip` / `import timm` only, then removes them from sys.modules.

A placeholder attribute is an empty class (so isinstance checks, subclassing, dict keys and
`InterpolationMode.BICUBIC`-style attribute chains at import time work); instantiating one raises.
Where torchvision is installed it is used and nothing is stubbed (a CUDA build that cannot load
is reported as an ImportError, so the reference tests skip with that reason).

Install recipe (CPU, no torchvision, ~20 MB): pip install --no-deps open-clip-torch==3.3.0
timm==1.0.29 ftfy==6.3.1 (their other dependencies come with transformers).
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

_STUB_ROOT = "torchvision"


class _PlaceholderMeta(type):
  """Metaclass: any missing class attribute is another placeholder class."""

  def __getattr__(cls, name: str) -> Any:
    if name.startswith("__"):
      raise AttributeError(name)
    return _placeholder(f"{cls.__qualname__}.{name}")


def _refuse(self, *args, **kwargs) -> None:
  raise RuntimeError(
      f"{type(self).__qualname__} is a torchvision placeholder (tests/torchvision_cpu.py); "
      "the open_clip reference tests must not call torchvision.")


def _placeholder(qualname: str) -> type:
  return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {
      "__qualname__": qualname, "__init__": _refuse, "__module__": _STUB_ROOT})


class _StubModule(types.ModuleType):
  """A module whose every missing public attribute is a cached placeholder class."""

  def __getattr__(self, name: str) -> Any:
    if name.startswith("__"):
      raise AttributeError(name)
    value = _placeholder(f"{self.__name__}.{name}")
    setattr(self, name, value)
    return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Serves `torchvision` and every `torchvision.*` as a _StubModule package."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname == _STUB_ROOT or fullname.startswith(_STUB_ROOT + "."):
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _StubModule(spec.name)
    module.__path__ = []
    module.__version__ = "0.0.0+placeholder"
    return module

  def exec_module(self, module) -> None:
    pass


def _prime_transformers_probes() -> None:
  """Caches transformers' "is torchvision installed?" answers (False) before the stub exists.

  open_clip imports transformers; its lru-cached probes would otherwise see the stub, answer True
  for the rest of the process, and make e.g. `from transformers import CLIPModel` import
  torchvision after the stub is gone.
  """
  if importlib.util.find_spec("transformers") is None:
    return
  from transformers.utils import import_utils  # pylint: disable=g-import-not-at-top
  for name in dir(import_utils):
    if name.startswith("is_torchvision") and name.endswith("_available"):
      getattr(import_utils, name)()


def import_open_clip() -> types.ModuleType:
  """Returns the imported open_clip module (timm imported too); raises ImportError if missing.

  With a real, importable torchvision this is a plain import. Otherwise torchvision is stubbed
  only while open_clip and timm import, and the stub modules are dropped afterwards so nothing
  else (transformers' availability checks, other tests) can see them.
  """
  if "open_clip" in sys.modules:
    return sys.modules["open_clip"]
  for name in ("open_clip", "timm"):
    if importlib.util.find_spec(name) is None:
      raise ImportError(f"{name} is not installed (see tests/torchvision_cpu.py for the recipe)")
  real_torchvision = importlib.util.find_spec(_STUB_ROOT) is not None
  if real_torchvision:
    try:
      import open_clip  # pylint: disable=g-import-not-at-top  (optional heavy dependency)
    except RuntimeError as e:  # A CUDA torchvision next to CPU torch: torchvision::nms missing.
      raise ImportError(
          f"torchvision is installed but cannot load next to torch ({e}); it breaks transformers "
          "too. Uninstall it: open_clip's reference tests need no torchvision (module "
          "docstring).") from e
    return open_clip
  _prime_transformers_probes()
  finder = _StubFinder()
  sys.meta_path.insert(0, finder)
  try:
    importlib.import_module("timm")  # Its torchvision imports happen under the stub too.
    import open_clip  # pylint: disable=g-import-not-at-top
  finally:
    sys.meta_path.remove(finder)
    for name in [n for n in sys.modules if n == _STUB_ROOT or n.startswith(_STUB_ROOT + ".")]:
      del sys.modules[name]
  return open_clip
