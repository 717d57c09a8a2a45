"""Test-suite setup: 8 fake CPU devices, set before JAX is imported anywhere.

Every test may assume `len(jax.devices()) == 8` on CPU (and must still build its meshes
explicitly). The repo root goes on sys.path so `tests.toy_system` imports as a module path.
"""

import os
import shutil
import sys
import tempfile

# FASHION_JAX_TEST_PLATFORMS=cuda,cpu runs the GPU-only tests (benchmarks/gpu_mfu.sh cudnn_tests)
# on a GPU machine; everything else assumes the CPU.
os.environ["JAX_PLATFORMS"] = os.environ.get("FASHION_JAX_TEST_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Compile with XLA's cheap backend settings (jax_disable_most_optimizations: backend
# optimisation level 0, LLVM's expensive passes off). The suite's programs are tiny, so
# compiling dominates their time; a test's reference and the code it checks are compiled the
# same way. Subprocesses inherit it. JAX_DISABLE_MOST_OPTIMIZATIONS=0 tests the optimised build.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# One persistent JAX compilation cache for the whole session: both xdist workers (started by the
# controller after this file ran, so they inherit the variable) and every subprocess a test
# starts (launch CLIs, kill/restart chains, notebook kernels; they copy os.environ) share it, so
# a program that several tests or processes compile (the toy trainer's step, a CLI run
# again) is compiled once. A fresh directory per session, removed at its end
# (pytest_unconfigure): no entry outlives the run. JAX_COMPILATION_CACHE_DIR already set by the
# caller is used as it is (and kept). Set FASHION_JAX_TEST_COMPILE_CACHE=0 to compile everything.
_OWN_CACHE_DIR = None
if (os.environ.get("FASHION_JAX_TEST_COMPILE_CACHE", "1") != "0"
    and not os.environ.get("JAX_COMPILATION_CACHE_DIR")):
  _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="fashion_jax_test_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE_DIR is not None:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: a heavy check (subprocesses, long runs); left out of the default run "
      "by pytest.ini, run with -m slow.")


@pytest.fixture
def toy_config():
  """A fresh toy trainer config (tests/toy_system.get_config)."""
  from tests import toy_system  # pylint: disable=g-import-not-at-top
  return toy_system.get_config()
