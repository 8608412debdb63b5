"""`PatchViT`: a small vision transformer (patchify conv, pre-norm blocks) for tests and benchmarks.

| tensor | shape |
|---|---|
| frames | (N, C, image_size, image_size) |
| out | (N, P, dim), P = (image_size // patch_size) ** 2 patch tokens per frame, no class token |

Attention is plain PyTorch math (any dtype, float64 included) and never mixes frames, so the tower
runs on any subset of the frames (MM-SP stage 1) and on an empty batch. It stands in for SigLIP in
tests and benchmarks; any module with the same frames -> (N, P, D) contract (or whose output has
`.last_hidden_state`, as transformers' vision models) plugs into `VisionLanguageModel`. Not here:
pretrained weights, image preprocessing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchViT"]


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, kw: dict):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, **kw)
        self.qkv = nn.Linear(dim, 3 * dim, **kw)
        self.proj = nn.Linear(dim, dim, **kw)
        self.norm2 = nn.LayerNorm(dim, **kw)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim, **kw)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, P, E = x.shape
        H = self.num_heads
        q, k, v = self.qkv(self.norm1(x)).view(N, P, 3, H, E // H).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * (E // H) ** -0.5
        attn = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(N, P, E)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchViT(nn.Module):
    """Patchify conv + learned positions + `num_layers` pre-norm transformer blocks + final LayerNorm."""

    def __init__(self, image_size: int = 16, patch_size: int = 4, in_channels: int = 3, dim: int = 32,
                 num_heads: int = 2, num_layers: int = 1, mlp_ratio: int = 2, *, dtype=None, device=None):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        kw = {"dtype": dtype, "device": device}
        self.image_size, self.in_channels, self.dim = image_size, in_channels, dim
        self.num_patches = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size, **kw)
        self.pos = nn.Parameter(torch.randn(1, self.num_patches, dim, **kw) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_ratio, kw) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim, **kw)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"frames must be (N, {', '.join(map(str, expected))}), "
                             f"got {getattr(frames, 'shape', frames)}")
        x = self.patch(frames).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
