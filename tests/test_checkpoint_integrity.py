"""Checkpoints of FSDP2-sharded training, and what happens when a checkpoint is damaged.

On 4 gloo ranks (a pool):
- FSDP dp2 x ring2 trains 2 steps, saves, trains 2 more. Resumed on the same layout from the save,
  the 2 further steps give bit-for-bit the same losses and parameters (same sums in the same order).
- The same checkpoint loaded WITHOUT FSDP on tp2 x ring2 (every axis changed) holds exactly the saved
  dense parameters (loading copies), and its next step's loss equals the FSDP run's to float32
  round-off (1e-5 relative: a different reduction order, measured ~1e-7); saved back from there and
  loaded under FSDP ring2 x ulysses2, the parameters are again exactly the saved ones.
- FSDP shards of uneven size (50 vocabulary rows over 4 ranks) save, and load in one process
  without groups, exactly.
- `verify_checkpoint` / `latest_intact_checkpoint` name a truncated and an altered file and fall back
  to the newest intact step; `load_checkpoint` on a truncated step (one process) raises a ValueError
  naming the file before DCP reads it.

With the trainer (ranks started by hand, so every rank's exit code is seen): tp2 x ring2 with FSDP
starts from a Hugging Face directory (`--init-from`), prints the per-rank bytes line, saves every
step and writes `--export-hf`, which transformers loads and which equals what
`python -m longvila_engine.export` writes from the last step. Then, on 2 ranks: the newest step
damaged -> `--resume` says which file is bad and resumes from the previous step; every step damaged
-> every rank exits non-zero with that message, within the collective timeout (no hang).
"""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from dist_pool import groups_for

from longvila_engine import ParallelLayout
from longvila_engine.checkpoint import latest_intact_checkpoint, verify_checkpoint

WORLD = 4
DP2_RING2 = ParallelLayout(dp=2, ring=2, gpus_per_node=4)
TP2_RING2 = ParallelLayout(tp=2, ring=2, gpus_per_node=4)
RING2_ULYSSES2 = ParallelLayout(ring=2, ulysses=2, gpus_per_node=4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


POOL_WORLD_SIZE = WORLD  # the session pool of this size (tests/conftest.py)


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


# --- the trainer: --init-from, --export-hf, damaged checkpoints, python -m longvila_engine.export ------
TRAIN_TIMEOUT_S = 30  # --timeout of every process group in these runs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, log_dir, world=4, limit=240):
    """Start `world` trainer ranks with torchrun's environment (no launcher), wait for all of them.

    Returns ([exit code per rank], [log text per rank]); a rank still running at `limit` is killed
    and reported as None (a hang)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    port = _free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(os.path.join(log_dir, f"rank{rank}.log"), "w")
        cmd = [sys.executable, "-m", "longvila_engine.train", "--seq-len", "40", "--batch", "2", "--lr", "1e-2",
               "--attention-backend", "reference", "--no-progress", "--timeout", str(TRAIN_TIMEOUT_S), *args]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=rank_env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    deadline = time.monotonic() + limit
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append(None)
        log.close()
    texts = []
    for rank in range(world):
        with open(os.path.join(log_dir, f"rank{rank}.log")) as f:
            texts.append(f.read())
    return codes, texts


def test_trainer_init_from_hf_export_and_damaged_resume(tmp_path):
    import transformers

    hf_dir, ck, out = str(tmp_path / "hf"), str(tmp_path / "ck"), str(tmp_path / "exported")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=False)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir, max_shard_size="20KB")
    common = ["--init-from", hf_dir, "--checkpoint-dir", ck]
    # 1. FSDP (auto: dp_sp = 2) from the HF weights, 3 steps, a checkpoint each, exported at the end.
    logs = tmp_path / "run1"
    logs.mkdir()
    codes, texts = _launch(
        ["--tp", "2", "--ring", "2", *common, "--steps", "3", "--save-every", "1", "--export-hf", out], str(logs)
    )
    assert codes == [0, 0, 0, 0], texts
    assert "per-rank state (FSDP2-sharded over dp_sp)" in texts[0], texts[0]
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert sorted(f for f in os.listdir(ck) if f.startswith("step_")) == [f"step_0000000{i}" for i in (1, 2, 3)]
    # The export CLI on the last step writes the same tensors as --export-hf.
    cli_out = str(tmp_path / "cli")
    subprocess.run([sys.executable, "-m", "longvila_engine.export", "--checkpoint-dir", ck, "--out", cli_out],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)  # fmt: skip
    cli = transformers.AutoModelForCausalLM.from_pretrained(cli_out)
    for (name, a), (_, b) in zip(back.state_dict().items(), cli.state_dict().items()):
        assert torch.equal(a, b), name
    # 2. Newest step damaged (truncated file): resumes from step 2, naming the file. Checkpoints are
    # layout-free, so 2 ranks (tp2, no FSDP) are enough here and below.
    newest = os.path.join(ck, "step_00000003")
    victim = sorted(f for f in os.listdir(newest) if f.endswith(".distcp"))[0]
    with open(os.path.join(newest, victim), "r+b") as f:
        f.truncate(5)
    logs = tmp_path / "run2"
    logs.mkdir()
    codes, texts = _launch(["--tp", "2", *common, "--steps", "3", "--resume", "latest"], str(logs), world=2)
    assert codes == [0, 0], texts
    assert victim in texts[0] and "truncated" in texts[0], texts[0]
    assert "resumed from" in texts[0] and "step_00000002 at step 2" in texts[0], texts[0]
    # 3. Every step damaged: every rank fails with the message, exit non-zero, no hang.
    for step in ("step_00000001", "step_00000002", "step_00000003"):
        meta = os.path.join(ck, step, "meta.json")
        with open(meta, "a") as f:
            f.write("garbage")
    logs = tmp_path / "run3"
    logs.mkdir()
    codes, texts = _launch(["--tp", "2", *common, "--steps", "4", "--resume", "latest"], str(logs), world=2,
                           limit=120)
    assert all(c not in (0, None) for c in codes), (codes, texts)
    for text in texts:
        assert "no intact checkpoint to resume from" in text and "meta.json is damaged" in text, text


def _uneven(root):
    """FSDP shards of uneven size (vocab 50 over 4 dp_sp ranks: 13, 13, 13, 11) save and load exactly."""
    import torch.distributed as dist

    from longvila_engine.checkpoint import load_checkpoint, save_checkpoint
    from longvila_engine.fsdp import shard_model
    from longvila_engine.models import ModelConfig, Transformer

    config = ModelConfig(num_layers=1, hidden_size=24, num_heads=2, num_kv_heads=1, head_dim=12,
                         ffn_hidden_size=40, vocab_size=50)  # fmt: skip
    groups = groups_for(DP2_RING2)
    model = shard_model(Transformer(config, groups, seed=7), groups)
    path = save_checkpoint(root, 1, model, None, groups)
    dist.barrier()
    if dist.get_rank() == 0:  # one process, no FSDP, no groups: the dense tensors
        dense = Transformer(config, None, seed=0)
        load_checkpoint(path, dense, None, None)
        want = Transformer(config, None, seed=7)
        for (name, a), (_, b) in zip(dense.named_parameters(), want.named_parameters()):
            assert torch.equal(a, b), name
    dist.barrier()
    return True


def test_uneven_fsdp_shards_round_trip(pool, tmp_path):
    assert all(pool.run(_uneven, str(tmp_path / "uneven")))


def test_load_names_a_truncated_file_before_reading(tmp_path):
    """An explicit step with a truncated file: ValueError naming it (no raw DCP EOFError)."""
    from longvila_engine.checkpoint import load_checkpoint, save_checkpoint
    from longvila_engine.models import Transformer, get_config

    model = Transformer(get_config("tiny"), None, seed=1)
    path = save_checkpoint(str(tmp_path), 1, model, None, None)
    victim = sorted(f for f in os.listdir(path) if f.endswith(".distcp"))[0]
    with open(os.path.join(path, victim), "r+b") as f:
        f.truncate(3)
    with pytest.raises(ValueError, match=f"{victim} is truncated"):
        load_checkpoint(path, Transformer(get_config("tiny"), None), None, None)
