"""Hugging Face vision towers for `VisionLanguageModel`: transformers' `SiglipVisionModel` from a local
folder, behind the frames -> (n, P, D) contract of MM-SP stage 1.

| tensor | shape |
|---|---|
| frames | (n, 3, image_size, image_size), preprocessed by the tower's own image processor |
| out | (n, P, D): patch features of `feature_layer` (LLaVA/VILA take the last or second-to-last layer) |

An empty batch (a rank without frames in stage 1) returns an empty (0, P, D) tensor that stays in the
autograd graph, so every rank's parameters get (zero) gradients and all ranks run the same collectives.
Not here: image preprocessing (`data.load_image_processor`), downloads (local files only).
"""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["SiglipTower", "load_vision_tower"]


class SiglipTower(nn.Module):
    """`SiglipVisionModel` returning the patch features of one hidden layer (no pooling head)."""

    def __init__(self, model, feature_layer: int = -1):
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.image_size = cfg.image_size

    @classmethod
    def from_pretrained(cls, path: str, *, feature_layer: int = -1, dtype=torch.float32) -> SiglipTower:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"--vision {path}: no config.json there; pass a folder written by "
                             f"SiglipVisionModel.save_pretrained (or a SigLIP checkpoint folder)")
        cfg = SiglipVisionConfig.from_pretrained(path, local_files_only=True)
        if getattr(cfg, "attention_dropout", 0.0):
            cfg.attention_dropout = 0.0  # dropout would make ranks differ from one process
        model = SiglipVisionModel.from_pretrained(path, config=cfg, local_files_only=True, dtype=dtype)
        for module in model.modules():
            if getattr(module, "use_head", False) and isinstance(getattr(module, "head", None), nn.Module):
                # The attention-pooling head makes the pooled output, which a VLM never reads (LLaVA/VILA
                # drop it too): it would cost compute and hold trainable parameters without a gradient.
                del module.head
                module.use_head = False
        # Our own attention path is not needed here (frames never mix), but eager keeps float64 tests exact.
        return cls(model, feature_layer)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.shape[0] == 0:
            # Zero-times-parameter keeps the graph: the tower's parameters get zero gradients here.
            anchor = sum(p.reshape(-1)[0] for p in self.model.parameters()) * 0.0
            return frames.new_zeros((0, self.num_patches, self.hidden_size)) + anchor
        if self.feature_layer == -1:
            return self.model(pixel_values=frames).last_hidden_state
        out = self.model(pixel_values=frames, output_hidden_states=True)
        return out.hidden_states[self.feature_layer]


def load_vision_tower(path: str, *, feature_layer: int = -1, dtype=torch.float32) -> SiglipTower:
    """The vision tower at `path` (a SigLIP folder)."""
    return SiglipTower.from_pretrained(path, feature_layer=feature_layer, dtype=dtype)
