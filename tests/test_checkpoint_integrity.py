"""Checkpoints of FSDP2-sharded training, and what happens when a checkpoint is damaged.

On 4 gloo ranks (a pool):
- FSDP dp2 x ring2 trains 2 steps, saves, trains 2 more. Resumed on the same layout from the save,
  the 2 further steps give bit-for-bit the same losses and parameters (same sums in the same order).
- The same checkpoint loaded WITHOUT FSDP on tp2 x ring2 (every axis changed) holds exactly the saved
  dense parameters (loading copies), and its next step's loss equals the FSDP run's to float32
  round-off (1e-5 relative: a different reduction order, measured ~1e-7); saved back from there and
  loaded under FSDP ring2 x ulysses2, the parameters are again exactly the saved ones.
- `verify_checkpoint` / `latest_intact_checkpoint` name a truncated and an altered file and fall back
  to the newest intact step; `load_checkpoint` on a damaged step raises a ValueError naming the file.

With the trainer (torchrun, 4 ranks): the newest step damaged -> `--resume` says which file is bad
and resumes from the previous step; every step damaged -> every rank exits non-zero with that
message, within the collective timeout (no hang).
"""

import os

import pytest
import torch
from dist_pool import DistPool, groups_for

from longvila_engine import ParallelLayout
from longvila_engine.checkpoint import latest_intact_checkpoint, verify_checkpoint

WORLD = 4
DP2_RING2 = ParallelLayout(dp=2, ring=2, gpus_per_node=4)
TP2_RING2 = ParallelLayout(tp=2, ring=2, gpus_per_node=4)
RING2_ULYSSES2 = ParallelLayout(ring=2, ulysses=2, gpus_per_node=4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pool():
    p = DistPool(WORLD)
    yield p
    p.close()


def _setup(layout, fsdp):
    from longvila_engine.train import build_data, build_model, build_optimizer, parse_args

    args = parse_args(
        ["--model", "tiny", "--seq-len", "40", "--batch", "2", "--lr", "1e-2", "--seed", "5",
         "--attention-backend", "reference", "--no-progress", "--fsdp", fsdp]
    )  # fmt: skip
    groups = groups_for(layout)
    model = build_model(args, groups)
    return args, groups, model, build_optimizer(model, args.lr), build_data(args)


def _steps(args, groups, model, optimizer, data, first, count):
    from longvila_engine.models import local_batch
    from longvila_engine.train import global_batch, train_step

    out = []
    for step in range(first, first + count):
        batch = local_batch(global_batch(data, step, args.batch, groups), groups)
        out.append(train_step(model, optimizer, batch, groups, grad_clip=args.grad_clip)["loss"])
    return out


def _dense(model, groups):
    """{name: dense float tensor} of the whole model (gathered over dp_sp and tp), on every rank."""
    import torch.distributed as dist

    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        if p.tp_dim is not None and groups.tp_size > 1:
            parts = [torch.empty_like(t) for _ in range(groups.tp_size)]
            dist.all_gather(parts, t.contiguous(), group=groups.tp)
            t = torch.cat(parts, dim=p.tp_dim)
        out[name] = t.clone()
    return out


def _round_trip(root):
    import torch.distributed as dist

    from longvila_engine.checkpoint import load_checkpoint, save_checkpoint

    # FSDP dp2 x ring2: 2 steps, save, 2 more.
    args, groups, model, opt, data = _setup(DP2_RING2, "on")
    _steps(args, groups, model, opt, data, 0, 2)
    path = save_checkpoint(root, 2, model, opt, groups, meta={"note": "kept"})
    saved = _dense(model, groups)
    after = _steps(args, groups, model, opt, data, 2, 2)
    final = _dense(model, groups)
    # Same layout, fresh model: bit-for-bit.
    args, groups, model, opt, data = _setup(DP2_RING2, "on")
    meta = load_checkpoint(path, model, opt, groups, verify=True)
    assert meta["step"] == 2 and meta["note"] == "kept" and meta["sharding"] == "fsdp2"
    assert _steps(args, groups, model, opt, data, 2, 2) == after
    resumed = _dense(model, groups)
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    # Every axis changed, FSDP off: exactly the saved tensors; next loss at float32 round-off.
    args, groups, model, opt, data = _setup(TP2_RING2, "off")
    load_checkpoint(path, model, opt, groups)
    loaded = _dense(model, groups)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    loss = _steps(args, groups, model, opt, data, 2, 1)[0]
    assert abs(loss - after[0]) <= 1e-5 * abs(after[0]), (loss, after[0])
    # ... and back into FSDP on a third layout.
    args, groups, model2, opt2, data = _setup(TP2_RING2, "off")
    load_checkpoint(path, model2, opt2, groups)
    path2 = save_checkpoint(root, 3, model2, opt2, groups)
    args, groups, model3, opt3, data = _setup(RING2_ULYSSES2, "on")
    assert load_checkpoint(path2, model3, opt3, groups)["sharding"] == "replicated"
    again = _dense(model3, groups)
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    dist.barrier()
    return True


def test_fsdp_checkpoint_round_trip_across_layouts(pool, tmp_path):
    assert all(pool.run(_round_trip, str(tmp_path / "ck")))
    # Damage the newest step: truncate one data file; the older step is what remains intact.
    root = str(tmp_path / "ck")
    newest = os.path.join(root, "step_00000003")
    victim = sorted(f for f in os.listdir(newest) if f.endswith(".distcp"))[0]
    with open(os.path.join(newest, victim), "r+b") as f:
        f.truncate(10)
    problems = verify_checkpoint(newest)
    assert len(problems) == 1 and victim in problems[0] and "truncated" in problems[0]
    path, skipped = latest_intact_checkpoint(root)
    assert path == os.path.join(root, "step_00000002")
    assert skipped[0][0] == newest and victim in skipped[0][1]
    # Alter a byte (same size) of the older one: nothing intact, both reasons given.
    older = os.path.join(root, "step_00000002")
    target = os.path.join(older, sorted(f for f in os.listdir(older) if f.endswith(".distcp"))[-1])
    with open(target, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    path, skipped = latest_intact_checkpoint(root)
    assert path is None and len(skipped) == 2 and "altered" in skipped[1][1]
    assert os.path.basename(target) in skipped[1][1]
