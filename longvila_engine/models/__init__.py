"""Models: the Llama-class `Transformer` over tp x sp, its configs and the sequence-parallel loss."""

from .config import PRESETS, ModelConfig, get_config
from .loss import LocalBatch, divide_by_global_count, global_positions, local_batch, shift_labels
from .transformer import Transformer

__all__ = [
    "ModelConfig",
    "PRESETS",
    "get_config",
    "Transformer",
    "LocalBatch",
    "local_batch",
    "shift_labels",
    "global_positions",
    "divide_by_global_count",
]
