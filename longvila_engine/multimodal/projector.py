"""`MLPProjector`: per-frame patch features -> language-model embeddings, with optional spatial merging.

| arg | shape |
|---|---|
| features | (N, P, in_dim): N frames of P patch features on a square g x g patch grid (P = g*g when pool > 1) |
| out | (N, P', out_dim): P' = P for pool=1, ceil(g/pool)^2 otherwise |

pool=1 is LLaVA's `mlp2x_gelu` (Linear, GELU, Linear). pool=2 merges each 2 x 2 block of neighbouring
patches into one token by concatenating their features (space-to-depth, VILA's `mlp_downsample`;
an odd grid is zero-padded at the right and bottom), then LayerNorm, Linear, GELU, Linear: 4x fewer
visual tokens for the language model. Each frame is projected on its own, so the projector runs on
any subset of frames (MM-SP stage 1). Not here: the vision tower, and anything that mixes frames.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLPProjector"]


class MLPProjector(nn.Module):
    """Two-layer GELU MLP from the vision width to the language-model width; `pool` x `pool` merging."""

    def __init__(self, in_dim: int, out_dim: int, pool: int = 1, *, hidden_dim: int | None = None, dtype=None,
                 device=None):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("pool", pool)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MLPProjector {name}={value!r} must be an int >= 1")
        if pool not in (1, 2):
            raise ValueError(f"MLPProjector pool={pool} is not supported; choose 1 (no merging) or 2 (2x2 merging)")
        self.in_dim, self.out_dim, self.pool = in_dim, out_dim, pool
        merged = in_dim * pool * pool
        hidden_dim = out_dim if hidden_dim is None else hidden_dim
        kw = {"dtype": dtype, "device": device}
        self.norm = nn.LayerNorm(merged, **kw) if pool > 1 else None
        self.fc1 = nn.Linear(merged, hidden_dim, **kw)
        self.fc2 = nn.Linear(hidden_dim, out_dim, **kw)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        N, P, D = x.shape
        g = math.isqrt(P)
        if g * g != P:
            raise ValueError(f"pool={self.pool} needs a square patch grid, but frames have P={P} patch tokens")
        k = self.pool
        G = -(-g // k) * k
        grid = x.reshape(N, g, g, D)
        if G != g:
            grid = F.pad(grid, (0, 0, 0, G - g, 0, G - g))
        blocks = grid.reshape(N, G // k, k, G // k, k, D).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(N, (G // k) ** 2, k * k * D)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[-1] != self.in_dim:
            raise ValueError(f"features must be (N, P, {self.in_dim}), got {getattr(features, 'shape', features)}")
        x = features
        if self.pool > 1:
            x = self.norm(self._merge(x))
        return self.fc2(F.gelu(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, pool={self.pool}"
