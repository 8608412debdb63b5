"""Scale dry run: the trainer's own training step as one rank of a fake world, without GPUs or memory.

    python -m longvila_engine.dryrun --model llama3_8b --seq-len 2M --world 256 --ring 32 --ulysses 8
    python -m longvila_engine.dryrun --sweep [--json out.jsonl]

What it measures and how is in step.py's docstring. The package's parts:

| module | what |
|---|---|
| step.py | the configuration, one fake-world training step under the trackers, depth extrapolation |
| instruments.py | FLOP formulas for the attention ops, the dispatch recorder, RMSNorm as CUDA keeps it |
| report.py | the cost model beside the result, the printed report, the fake-CUDA check, the sweep, the CLI |
"""
from .instruments import _rms_norm_saving_input, attention_flop_formulas
from .report import cost_model_view, fake_cuda_forward, longest_fitting, main, report, sweep, sweep_table, sweep_ulysses
from .step import (
    DryRunConfig,
    _regroup,
    build_state,
    dry_run,
    dry_run_extrapolated,
    model_config,
    parse_tokens,
    plan_batch,
    run_step,
)

__all__ = [
    "DryRunConfig",
    "dry_run",
    "dry_run_extrapolated",
    "parse_tokens",
    "model_config",
    "build_state",
    "plan_batch",
    "run_step",
    "attention_flop_formulas",
    "cost_model_view",
    "fake_cuda_forward",
    "report",
    "sweep",
    "sweep_table",
    "sweep_ulysses",
    "longest_fitting",
    "main",
    "_regroup",
    "_rms_norm_saving_input",
]
