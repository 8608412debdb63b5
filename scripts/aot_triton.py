"""Compile every Triton kernel ahead of time for sm_80 and sm_90 (bf16/fp16, head dims 64/128, causal
and not) and print tile, warps, stages, registers, spills, shared memory and TMA copies (PTX
`cp.async.bulk.tensor`) per kernel. Needs no GPU. Exits 1 if any compile fails, any kernel spills
registers, ptxas serializes wgmma (C7515) on sm_90, or a tensor-descriptor kernel has no TMA copy.

    python scripts/aot_triton.py                       # the full table
    python scripts/aot_triton.py --arch 90 --dtype fp16 --head-dim 64 --kernel attn_fwd
    python scripts/aot_triton.py --fresh               # ignore triton's on-disk cache
    python scripts/aot_triton.py --variants --arch 90 --dtype fp16 --head-dim 64   # every flag combination
    python scripts/aot_triton.py --markdown build/aot_table.md   # also write the table as markdown
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _compile(job):
    from longvila_engine.kernels.triton import aot

    try:
        return aot.compile_kernel(*job), None
    except Exception:  # report every failure, then exit non-zero
        return None, traceback.format_exc()


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unsetting TRITON_INTERPRET: kernels cannot be compiled by an interpreting triton", file=sys.stderr)
        del os.environ["TRITON_INTERPRET"]
    from longvila_engine.kernels.triton import aot

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS), choices=aot.ARCHS)
    parser.add_argument("--dtype", nargs="+", default=list(aot.DTYPES), choices=aot.DTYPES + ("fp32",))
    parser.add_argument("--head-dim", type=int, nargs="+", default=list(aot.HEAD_DIMS))
    parser.add_argument("--variants", action="store_true",
                        help="every causal/varlen/resume-or-accumulate variant, not only the ring's hot path")
    parser.add_argument("--kernel", nargs="+", choices=aot.kernel_names(all_variants=True), metavar="NAME",
                        help="kernel names, as printed (default: every kernel)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel")
    parser.add_argument("--fresh", action="store_true", help="compile into an empty triton cache")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as markdown to PATH")
    args = parser.parse_args(argv)

    kernels = args.kernel or aot.kernel_names(all_variants=args.variants)
    if args.fresh:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-aot-")
    jobs = [(k, a, d, h) for a in args.arch for d in args.dtype for h in args.head_dim for k in kernels]
    start = time.perf_counter()
    print(aot.HEADER)
    failures, rejected, results = 0, [], []
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(jobs)))) as pool:
        for job, (result, error) in zip(jobs, pool.map(_compile, jobs)):
            if error is None:
                print(aot.format_row(result), flush=True)
                results.append(result)
                if result.problems:
                    notes = "".join(f"\n    ptxas: {n}" for n in result.ptxas_notes)
                    rejected.append(f"{result.name} sm_{result.arch} {result.dtype} D={result.head_dim}: "
                                    + "; ".join(result.problems) + notes)
            else:
                failures += 1
                print(f"{job[0]:<36} sm_{job[1]:<3} {job[2]:<5} {job[3]:>4} FAILED\n{error}", flush=True)
    print(f"{len(jobs) - failures}/{len(jobs)} compiled in {time.perf_counter() - start:.1f} s; "
          f"{len(rejected)} rejected (spills, wgmma serialized on sm_90, or descriptors without TMA)")
    for line in rejected:
        print("REJECTED " + line)
    if args.markdown:
        _write_markdown(args.markdown, results)
    return 1 if failures or rejected else 0


def _write_markdown(path: str, results) -> None:
    lines = ["| kernel | arch | dtype | D | tile | warps | stages | regs | spills (B) | smem (B) | TMA copies |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| `{r.name}` | sm_{r.arch} | {r.dtype} | {r.head_dim} | {r.block} | {r.warps} | {r.stages} | "
              f"{r.n_regs} | {r.n_spills} | {r.shared} | {r.tma_copies} |" for r in results]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"markdown table: {path}")


if __name__ == "__main__":
    sys.exit(main())
