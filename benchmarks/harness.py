"""The one benchmark harness every script under benchmarks/ uses.

It times a callable (warm-up, several repeats, median with min/max and quartiles), turns the median
into GFLOP/s and tokens/s from figures the caller passes in (FLOPs come from
`longvila_engine.ops.flops`, never counted here), measures peak memory, and appends one JSON line per
measurement to benchmarks/results/<name>.jsonl together with the environment (device, torch/triton
versions, git sha, date). It also prints tables, wraps config loops in a tqdm bar and draws PNG plots
with matplotlib's Agg backend.

Peak memory is measured on an untimed call (the first warm-up), so the timed repeats carry no sampling
or profiling overhead:
- CUDA: `torch.cuda.max_memory_allocated` growth over the call.
- CPU: two figures. `peak_alloc_mb` is the high-water mark of torch's CPU allocator during the call,
  from the profiler's memory events (exact for tensors, blind to plain malloc inside extensions).
  `peak_rss_mb` is the growth of the process's resident set, read from /proc/self/statm by a sampling
  thread after `malloc_trim` (sees every allocation, but only at the sampling period and only pages
  actually touched).

It does not pick sizes, compare backends or assert targets: the scripts do that and only report.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LONGVILA_RESULTS_DIR sends every results file elsewhere (smoke runs: an ignored folder).
RESULTS_DIR = os.environ.get("LONGVILA_RESULTS_DIR") or os.path.join(REPO_ROOT, "benchmarks", "results")

_state = {"profiler_warm": False}
# Lines the profiler writes to stderr on every session; anything else it writes is passed through.
_PROFILER_NOISE = ("USDT:", "profiler_start", "profiler_stop", "allocated before the profiling started")


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------

def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence (mean of the two middle values for an even count)."""
    if len(xs) == 0:
        raise ValueError("median of an empty sequence")
    s = sorted(xs)
    mid = len(s) // 2
    return float(s[mid]) if len(s) % 2 else (s[mid - 1] + s[mid]) / 2.0


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default method), q in [0, 1]."""
    if len(xs) == 0:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


@dataclass
class Timing:
    """Wall-clock times of the timed repeats, in seconds."""

    times: list[float]

    @property
    def median(self) -> float:
        return median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def q1(self) -> float:
        return quantile(self.times, 0.25)

    @property
    def q3(self) -> float:
        return quantile(self.times, 0.75)

    def summary_ms(self) -> dict:
        """The fields every results line carries about time."""
        return {"median_ms": self.median * 1e3, "min_ms": self.min * 1e3, "max_ms": self.max * 1e3,
                "q1_ms": self.q1 * 1e3, "q3_ms": self.q3 * 1e3, "repeats": len(self.times)}


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], *, device="cpu", warmup: int = 1, repeats: int = 5, min_repeats: int = 3,
            budget_s: float | None = None) -> Timing:
    """Call `fn` `warmup` times untimed, then time up to `repeats` calls.

    With `budget_s`, repeats stop early once the timed calls have used the budget, but never before
    `min_repeats` calls. Garbage collection is off while timing (a collection inside a repeat is noise).
    """
    if repeats < 1 or min_repeats < 1:
        raise ValueError(f"repeats and min_repeats must be >= 1, got {repeats} and {min_repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    times: list[float] = []
    try:
        spent = 0.0
        for i in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            dt = time.perf_counter() - t0
            times.append(dt)
            spent += dt
            if budget_s is not None and i + 1 >= min_repeats and spent >= budget_s:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(times)


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS so RSS growth reflects this call's pages (glibc only)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssSampler:
    """Samples the resident set every `period_s` in a thread; torch ops release the GIL, so it runs."""

    def __init__(self, period_s: float = 0.001):
        self.period_s = period_s
        self.base = _rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


@contextlib.contextmanager
def _quiet_profiler_stderr():
    """The CPU profiler prints start/stop lines to fd 2; drop those, pass everything else through."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if line.strip() and not any(n in line for n in _PROFILER_NOISE):
                    print(line, file=sys.stderr)


def _peak_from_memory_events(prof) -> int | None:
    """High-water mark of live bytes from the profiler's allocation (+) and free (-) events."""
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    deltas = [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"]
    deltas.sort(key=lambda t: t[0])  # stable: same-time events keep the order they were recorded in
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


def _warm_profiler() -> None:
    """Run one empty profiler session: the first maps ~70 MB that no measured call should carry."""
    if _state["profiler_warm"]:
        return
    _state["profiler_warm"] = True
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_profiler_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            pass
    except Exception:
        pass


def _start_memory_profiler():
    """An entered torch profiler recording allocations, or None where the profiler is unusable."""
    try:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.__enter__()
        return prof
    except Exception:  # a build without the profiler: RSS alone
        return None


def cuda_event_times(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 2) -> Timing:
    """Call `fn` `warmup` times, then time `repeats` calls with CUDA events recorded around each call
    on the current stream (GPU time of the queued work, no host timer). Needs a CUDA GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_event_times needs a CUDA GPU (torch.cuda.is_available() is False); "
                           "use time_fn on CPU")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return Timing(times)


def cuda_event_ms(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 2) -> tuple[float, float, float]:
    """(median, min, max) milliseconds of `cuda_event_times`."""
    t = cuda_event_times(fn, repeats=repeats, warmup=warmup)
    return t.median * 1e3, t.min * 1e3, t.max * 1e3


def measure_memory(fn: Callable[[], Any], *, device="cpu") -> tuple[dict, Any]:
    """Call `fn` once and return ({'peak_alloc_mb', 'peak_rss_mb'}, fn's result). Values may be None."""
    device = torch.device(device)
    mib = float(2 ** 20)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return {"peak_alloc_mb": peak / mib, "peak_rss_mb": None}, result
    _warm_profiler()
    gc.collect()
    _malloc_trim()
    peak_alloc = None
    with _RssSampler() as rss, _quiet_profiler_stderr():
        prof = _start_memory_profiler()
        try:
            result = fn()
        finally:
            if prof is not None:
                prof.__exit__(None, None, None)
        if prof is not None:
            peak_alloc = _peak_from_memory_events(prof)
    return {"peak_alloc_mb": None if peak_alloc is None else peak_alloc / mib,
            "peak_rss_mb": (rss.peak - rss.base) / mib}, result


# --------------------------------------------------------------------------------------------------
# Environment and results file
# --------------------------------------------------------------------------------------------------

def configure_threads() -> int:
    """torch.set_num_threads from OMP_NUM_THREADS, else the cores this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        n = int(env)
    else:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:
            n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device="cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{_cpu_name()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def environment(device="cpu") -> dict:
    """Facts about this run that every results line repeats."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": describe_device(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "threads": torch.get_num_threads(),
        "hostname": platform.node(),
    }


class ResultsFile:
    """Appends JSON lines to benchmarks/results/<name>.jsonl (or `results_dir`), one per measurement.

    Every line carries `bench`, a `run_id` shared by the lines of one run (ratios are only meaningful
    within one run on a noisy machine), the date and the environment.
    """

    def __init__(self, name: str, *, results_dir: str | None = None, device="cpu"):
        self.name = name
        self.dir = results_dir or RESULTS_DIR
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, f"{name}.jsonl")
        self.run_id = uuid.uuid4().hex[:12]
        self.env = environment(device)

    def append(self, record: dict) -> dict:
        line = {"bench": self.name, "run_id": self.run_id,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **self.env, **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(line, default=str) + "\n")
        return line


def read_results(path: str, run_id: str | None = None) -> list[dict]:
    """Lines of a results file, optionally only those of one run."""
    rows = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                if run_id is None or row.get("run_id") == run_id:
                    rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------------------------------

@dataclass
class Measurement:
    """A results line (`record`) and the output of the untimed memory-probe call (`output`)."""

    record: dict
    output: Any = field(default=None, repr=False)


def measure(fn: Callable[[], Any], *, case: str, backend: str, config: dict, flops: int | None = None,
            tokens: int | None = None, comm_bytes: dict | None = None, device="cpu", warmup: int = 1,
            repeats: int = 5, min_repeats: int = 3, budget_s: float | None = None,
            results: ResultsFile | None = None, extra: dict | None = None) -> Measurement:
    """Probe memory, warm up, time, derive throughput, and append the line to `results`.

    The memory probe is the first of the `warmup` untimed calls. With `budget_s`, a call so slow that
    the remaining warm-ups and `min_repeats` would overrun the budget gets no further warm-up: at that
    size one-off costs are noise. `flops` (from longvila_engine.ops.flops) gives `gflops_per_s`;
    `tokens` gives `tokens_per_s`; `comm_bytes` ({group name: bytes sent}) is recorded as is.
    """
    t0 = time.perf_counter()
    memory, output = measure_memory(fn, device=device)
    first_s = time.perf_counter() - t0
    more = max(warmup - 1, 0)
    if budget_s is not None and first_s * (more + min_repeats) > budget_s:
        more = 0
    for _ in range(more):
        fn()
    timing = time_fn(fn, device=device, warmup=0, repeats=repeats, min_repeats=min_repeats, budget_s=budget_s)
    med = timing.median
    record = {"case": case, "backend": backend, "config": dict(config), **timing.summary_ms(),
              "flops": flops, "gflops_per_s": None if flops is None else flops / med / 1e9,
              "tokens": tokens, "tokens_per_s": None if tokens is None else tokens / med, **memory}
    if comm_bytes is not None:
        record["comm_bytes"] = dict(comm_bytes)
    if extra:
        record.update(extra)
    if results is not None:
        record = results.append(record)
    return Measurement(record, output)


# --------------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------------

def progress(items: Iterable, *, desc: str = "", total: int | None = None):
    """A tqdm bar over configs on a terminal; plain iteration when stderr is not a tty (CI, tests)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total, disable=None, leave=False, dynamic_ncols=True)


def note(msg: str) -> None:
    """Print a line without breaking an active tqdm bar."""
    try:
        from tqdm import tqdm

        tqdm.write(msg)
    except ImportError:
        print(msg)


def _lookup(row: dict, key: str):
    """`key` may be dotted to reach into nested dicts, e.g. 'config.seq_len'."""
    cur: Any = row
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as an aligned text table; columns are (header, dotted key, format spec)."""
    cells = [[h for h, _, _ in columns]]
    cells += [[_fmt(_lookup(r, key), spec) for _, key, spec in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]], *,
                title: str | None = None) -> None:
    if title:
        print(f"\n{title}")
    print(format_table(rows, columns))


def plot_lines(rows: Sequence[dict], *, x: str, y: str, series: Callable[[dict], str], path: str,
               panel: Callable[[dict], str] | None = None, title: str = "", xlabel: str | None = None,
               ylabel: str | None = None, logx: bool = True, logy: bool = True) -> str | None:
    """One PNG: per panel (subplot), one line per series of y against x (dotted keys). Returns the path,
    or None when matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in rows:
        xv, yv = _lookup(r, x), _lookup(r, y)
        if xv is None or yv is None:
            continue
        pname = panel(r) if panel else ""
        pts.setdefault(pname, {}).setdefault(series(r), []).append((xv, yv))
    if not pts:
        return None
    names = list(pts)  # panels in the order the rows came
    series_names = sorted({sname for per_panel in pts.values() for sname in per_panel})
    colors = {sname: f"C{i % 10}" for i, sname in enumerate(series_names)}  # one colour per series everywhere
    ncols = min(len(names), 3)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.8 * nrows), squeeze=False)
    for ax, pname in zip(axes.flat, names):
        for sname in sorted(pts[pname]):
            xy = sorted(pts[pname][sname])
            ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", label=sname, color=colors[sname])
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(pname, fontsize=9)
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(ylabel or y)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- launching ------------------------------------------------------------------------------------
def _spawned_rank(rank: int, world: int, init_file: str, fn: Callable, args) -> None:
    import torch.distributed as dist

    threads = max(1, (os.cpu_count() or 1) // world)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        fn(args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn: Callable, args, world: int) -> None:
    """Run the module-level `fn(args)` on `world` local gloo ranks (what `--smoke` does without
    torchrun): one file rendezvous, cores shared evenly, a 300 s timeout on every collective."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="lv_bench_") as tmp:
        mp.spawn(_spawned_rank, args=(world, os.path.join(tmp, "rendezvous"), fn, args), nprocs=world)
