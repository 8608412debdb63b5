"""Models: the Llama-class `Transformer` over tp x sp, its configs and the sequence-parallel loss."""

from .config import PRESETS, ModelConfig, get_config
from .loss import LocalBatch, global_positions, local_batch, sequence_parallel_loss, shift_labels
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
    "sequence_parallel_loss",
]
