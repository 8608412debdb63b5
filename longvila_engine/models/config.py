"""`ModelConfig`: the shape of a Llama-class decoder, and presets with the published shapes.

Presets (docs/design.md section 13, "Model shapes"): `tiny` for tests, `llama2_7b`, `llama3_8b`, `qwen2_7b`.
Only shapes and numerics live here; parallel options (tp sequence parallelism, activation
checkpointing) are arguments of `Transformer`, since one model trains under many layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["ModelConfig", "PRESETS", "get_config"]


@dataclass(frozen=True)
class ModelConfig:
    """Llama-class decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP, untied output head.

    | field | meaning |
    |---|---|
    | num_layers, hidden_size | depth and model width |
    | num_heads, num_kv_heads, head_dim | query heads, key/value heads (GQA), per-head width |
    | ffn_hidden_size | SwiGLU inner width |
    | vocab_size | embedding and output rows |
    | rope_theta, rms_norm_eps | RoPE base, RMSNorm epsilon |
    | qkv_bias | biases on the Q/K/V projections (Qwen2) |
    | init_std | std of the normal init (output projections scaled by 1/sqrt(2*num_layers)) |
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "ffn_hidden_size",
            "vocab_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r} must be an integer >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("rope_theta, rms_norm_eps and init_std must be positive")

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count of the dense model (embedding and head counted separately)."""
        E, H, K, D, F = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.ffn_hidden_size,
        )
        attn = E * H * D + 2 * E * K * D + H * D * E + (H * D + 2 * K * D if self.qkv_bias else 0)
        mlp = 3 * E * F
        return self.num_layers * (attn + mlp + 2 * E) + E + 2 * self.vocab_size * E


PRESETS = {
    "tiny": ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        ffn_hidden_size=128,
        vocab_size=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
    "llama2_7b": ModelConfig(
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        ffn_hidden_size=11008,
        vocab_size=32000,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
    "llama3_8b": ModelConfig(
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        ffn_hidden_size=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "qwen2_7b": ModelConfig(
        num_layers=28,
        hidden_size=3584,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        ffn_hidden_size=18944,
        vocab_size=152064,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
    ),
}


def get_config(name: str) -> ModelConfig:
    """The preset called `name` (one of `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
