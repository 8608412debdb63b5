"""Export a training checkpoint as a Hugging Face directory, in one process, without a GPU.

    python -m longvila_engine.export --checkpoint-dir runs/ck --out llama-finetuned [--step 400]

Reads the step's meta.json (the model's config, and the Hugging Face config it started from, both
recorded by `save_checkpoint`), verifies the step's checksums, loads the parameters (not the
optimizer state) from the layout-free DCP checkpoint, whatever layout and sharding saved it, and
writes them with `save_hf`. The whole model is held in host memory once (32 GB for 8B in float32).

Not here: the trainer's own `--export-hf` (written at the end of training, from the sharded model).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .checkpoint import latest_intact_checkpoint, load_checkpoint, read_meta, verify_checkpoint
from .models import ModelConfig, Transformer

__all__ = ["export_checkpoint", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_checkpoint(path: str, out: str, *, dtype: torch.dtype | None = None) -> dict:
    """Write the checkpoint step directory `path` as a Hugging Face directory `out`; returns its meta."""
    meta = read_meta(path)
    if "model_config" not in meta:
        raise ValueError(
            f"{path}/meta.json records no model_config (a checkpoint from before export support); "
            f"re-save it with the current trainer"
        )
    problems = verify_checkpoint(path)
    if problems:
        raise ValueError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
    model = Transformer(ModelConfig(**meta["model_config"]), None, dtype=torch.float32)
    load_checkpoint(path, model, None, None)
    if meta.get("hf_config"):
        model.hf_config = meta["hf_config"]
    model.save_hf(out, dtype=dtype)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longvila_engine.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint-dir", required=True, help="the trainer's --checkpoint-dir, or one step_* dir")
    p.add_argument("--out", required=True, help="the Hugging Face directory to write")
    p.add_argument("--step", type=int, default=None, help="which saved step (default: the newest intact one)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="of the written tensors (default float32)")
    args = p.parse_args(argv)
    root = args.checkpoint_dir
    if args.step is not None:
        path = os.path.join(root, f"step_{args.step:08d}")
    elif os.path.exists(os.path.join(root, "meta.json")):
        path = root
    else:
        path, skipped = latest_intact_checkpoint(root)
        for bad, why in skipped:
            print(f"skipping damaged {bad}: {why}", file=sys.stderr)
        if path is None:
            raise SystemExit(f"no intact checkpoint in {root!r}")
    try:
        meta = export_checkpoint(path, args.out, dtype=DTYPES.get(args.dtype))
    except ValueError as exc:
        raise SystemExit(f"export failed: {exc}") from exc
    print(f"wrote {args.out} from {path} (step {meta['step']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
