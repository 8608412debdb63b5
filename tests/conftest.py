"""Shared test set-up: the session's gloo process pools and the Triton-interpreter module's own process.

- `pool`: a pool of real gloo ranks (tests/dist_pool.py) of the module's `POOL_WORLD_SIZE` (default
  4), shared by every module of the session that asks for that world size; `dist_pools.get(n)` gives
  any other size. Pools are closed when the session ends.
- tests/test_backend_triton.py decides, at its import, that the whole process runs an interpreting
  triton (TRITON_INTERPRET is read at the first `import triton`). Collected with the rest it would
  leak that mode into every later test, so it is collected only when named on the command line:
  `make pytest` runs it as a second pytest process. A run that skips it says so in its summary.
"""
import os
import sys

import pytest

# Tests may import tests/dist_pool.py as a plain module, in the test process and in spawned ranks.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "2")

from dist_pool import DistPools  # noqa: E402

TRITON_INTERPRETER_MODULE = "test_backend_triton.py"
_skipped_isolated: list = []


def _named_on_command_line(path, config) -> bool:
    for arg in config.args:
        target = arg.split("::", 1)[0]
        if os.path.abspath(target) == os.path.abspath(str(path)):
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    if collection_path.name != TRITON_INTERPRETER_MODULE or _named_on_command_line(collection_path, config):
        return None
    # pytest also asks about files beside the ones named; only a named directory above it means a skip.
    under_named_dir = any(os.path.isdir(a.split("::", 1)[0]) and str(collection_path).startswith(
        os.path.abspath(a.split("::", 1)[0]) + os.sep) for a in config.args)
    if under_named_dir and str(collection_path) not in _skipped_isolated:
        _skipped_isolated.append(str(collection_path))
    return True


def pytest_terminal_summary(terminalreporter):
    for path in _skipped_isolated:
        terminalreporter.write_line(f"not collected here (runs in its own process): pytest {os.path.relpath(path)}")


@pytest.fixture(scope="session")
def dist_pools():
    pools = DistPools()
    yield pools
    pools.close()


@pytest.fixture
def pool(request, dist_pools):
    """The session's pool for this module's POOL_WORLD_SIZE (default 4)."""
    return dist_pools.get(getattr(request.module, "POOL_WORLD_SIZE", 4))
