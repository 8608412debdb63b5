"""Pools of real gloo processes, spawned once per test session and world size, reused by many cases.

`DistPool(world_size)` starts `world_size` processes that join one gloo group through a file store
(with a timeout on every collective). `pool.run(fn, *args)` runs the module-level function
`fn(*args)` on every rank and returns the per-rank results. If any rank raises, or the call outlives
its deadline, every rank is killed (ranks blocked in a collective would otherwise hang) and the pool
restarts on the next call; the failing ranks' tracebacks are raised in the test process.

`DistPools` keeps one `DistPool` per world size; tests/conftest.py holds one for the whole session
and hands it to tests as the `pool` fixture (world size: the test module's `POOL_WORLD_SIZE`, default
4) or the `dist_pools` fixture (`dist_pools.get(8)`). Test modules do not start pools themselves.

Inside `fn`, `dist.get_rank()` works, and `groups_for(layout)` returns cached ParallelGroups.
No mocks: these are real process groups.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import tempfile
import time
import traceback

COLLECTIVE_TIMEOUT_S = 60
_GROUPS_CACHE: dict = {}


def groups_for(layout, timeout=COLLECTIVE_TIMEOUT_S):
    """ParallelGroups for `layout`, created once per worker process (group creation is collective)."""
    from longvila_engine.parallel import init_parallel

    if layout not in _GROUPS_CACHE:
        _GROUPS_CACHE[layout] = init_parallel(layout, timeout=timeout)
    return _GROUPS_CACHE[layout]


def _worker(rank, world_size, init_file, conn, threads):
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        conn.send(("ready", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world_size: int, threads: int = 1, timeout: float = 240.0):
        self.world_size = world_size
        self.threads = threads
        self.timeout = timeout
        self.procs: list = []
        self.conns: list = []

    def _start(self):
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="lv_pool_")
        init_file = os.path.join(self._dir.name, "rendezvous")
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, self.world_size, init_file, child, self.threads),
                               daemon=True)
            proc.start()
            self.procs.append(proc)
            self.conns.append(parent)
        self._collect("start-up")

    def _collect(self, what):
        # Wait on every rank at once: the first error is reported as soon as it arrives, instead of
        # waiting out a healthy rank that is blocked in a collective with the failed one.
        results, errors, pending = [None] * self.world_size, {}, dict(enumerate(self.conns))
        deadline = time.monotonic() + self.timeout
        while pending and not errors:
            left = deadline - time.monotonic()
            ready = mp_connection.wait(list(pending.values()), timeout=max(left, 0))
            if not ready:
                self.close()
                raise TimeoutError(f"ranks {sorted(pending)} gave no answer to {what} within {self.timeout:.0f} s; "
                                   "pool killed")
            for rank in [r for r, c in pending.items() if c in ready]:
                conn = pending.pop(rank)
                try:
                    status, value = conn.recv()
                except EOFError:
                    status, value = "error", f"rank {rank} died (exit code {self.procs[rank].exitcode})"
                if status == "error":
                    errors[rank] = value
                else:
                    results[rank] = value
        if errors:
            self.close()
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors.items())
            raise AssertionError(f"{what} failed on rank(s) {sorted(errors)}:\n{text}")
        return results

    def run(self, fn, *args, **kwargs):
        """Run fn(*args, **kwargs) on every rank; return the list of per-rank results."""
        if not self.procs:
            self._start()
        for conn in self.conns:
            conn.send((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", str(fn)))

    def close(self):
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(timeout=max(deadline - time.monotonic(), 0.05))
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs, self.conns = [], []
        if hasattr(self, "_dir"):
            self._dir.cleanup()


class DistPools:
    """One DistPool per world size, started on first use and closed together by `close()`.

    Sharing a pool across test modules saves each module its own spawn (a few seconds per rank on 2
    cores); a pool that failed restarts on its next use, so one failing module does not poison the next.
    """

    def __init__(self, threads: int = 1, timeout: float = 240.0):
        self.threads = threads
        self.timeout = timeout
        self._pools: dict[int, DistPool] = {}

    def get(self, world_size: int) -> DistPool:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if world_size not in self._pools:
            self._pools[world_size] = DistPool(world_size, threads=self.threads, timeout=self.timeout)
        return self._pools[world_size]

    def world_sizes(self) -> list[int]:
        """World sizes whose pool has live ranks now."""
        return sorted(w for w, p in self._pools.items() if p.procs)

    def close(self):
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
