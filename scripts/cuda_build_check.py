"""Check a CUDA build of longvila_engine._C on a machine without a GPU (run by scripts/cuda_build.sh).

Imports the extension through the package's own loader (with the CUDA .so on PYTHONPATH), lists every
`longvila_engine::` operator with the dispatch keys that have a kernel, and fails unless each operator
has a CUDA kernel, except those served on CUDA tensors by another backend (HOST_ONLY below). It also
runs the CPU operators once against the reference, since the CUDA build carries the CPU kernels too
(the instruction-set variants next to _C, one loaded by the package's loader).
Nothing here launches a CUDA kernel.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

# Operators with no CUDA kernel by design: on CUDA tensors, block attention runs through the Triton
# or aten backends (longvila_engine/ops), never through these.
HOST_ONLY = {
    "longvila_engine::attn_fwd": "CUDA tensors use the triton or aten backend",
    "longvila_engine::attn_bwd": "CUDA tensors use the triton or aten backend",
    "longvila_engine::cpu_info": "a host query about the CPU kernels (no tensor arguments)",
    "longvila_engine::cpu_peak_gflops": "a host measurement of the CPU's peak (no tensor arguments)",
    "longvila_engine::cpu_supports": "a host query about the CPU's instruction sets (no tensor arguments)",
}
KEYS = ("CPU", "CUDA", "Meta")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)

    import torch

    from longvila_engine import _extension

    _extension.require_extension()
    import longvila_engine._C as ext

    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("longvila_engine::"))
    if not ops:
        print("cuda-build: FAILED, the extension registered no longvila_engine operator")
        return 1
    table, missing = [], []
    for op in ops:
        has = {k: torch._C._dispatch_has_kernel_for_dispatch_key(op, k) for k in KEYS}
        # Fakes registered from Python show up as a Meta kernel or an abstract impl.
        has["fake"] = has.pop("Meta") or torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeImplicitAutograd")
        note = HOST_ONLY.get(op, "")
        if not has["CUDA"] and not note:
            missing.append(op)
        table.append({"op": op, **has, "note": note})
    from longvila_engine.ops import cpu as cpu_ops

    isa = cpu_ops.kernel_info().get("isa")
    print(f"cuda-build: {ext.__file__}")
    built = list(_extension.built_variants(os.path.dirname(ext.__file__)))
    print(f"cuda-build: CPU kernels: variant {isa} loaded, built: {built}")
    print(f"cuda-build: torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"GPU visible: {torch.cuda.is_available()}")
    print(f"{'operator':34} {'CPU':5} {'CUDA':5} note")
    for row in table:
        cuda = "yes" if row["CUDA"] else ("-" if row["note"] else "NO")
        print(f"{row['op']:34} {'yes' if row['CPU'] else 'NO':5} {cuda:5} {row['note']}")

    # The CPU kernels of this CUDA build still work (zigzag is a pure permutation: exact).
    x = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    y = torch.ops.longvila_engine.zigzag_permute(x, 2, 1, False)
    back = torch.ops.longvila_engine.zigzag_permute(y, 2, 1, True)
    expect = torch.cat([x[:, 0:2], x[:, 6:8], x[:, 2:4], x[:, 4:6]], dim=1)
    cpu_ok = bool(torch.equal(y, expect) and torch.equal(back, x))
    print(f"CPU zigzag_permute round trip on the CUDA build: {'ok' if cpu_ok else 'WRONG'}")

    ok = not missing and cpu_ok
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                       "extension": ext.__file__, "cpu_isa": isa, "ops": table, "missing_cuda": missing,
                       "cpu_roundtrip": cpu_ok, "ok": ok}, f, indent=1)
    if missing:
        print(f"cuda-build: FAILED, no CUDA kernel for {', '.join(missing)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
