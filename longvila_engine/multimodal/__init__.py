"""MM-SP multimodal training (docs/design.md section 7): two-stage sharding of frames and interleaved text.

`VisionLanguageModel` (model.py) runs the vision tower and projector on each rank's share of the
frames, then moves the visual tokens into the token-balanced sequence layout with one all-to-all-v;
`plan_multimodal_shards` (sharding.py) is the integer plan behind it; `MLPProjector` and the small
`PatchViT` are the stock projector and a test/benchmark vision tower.
"""
from .model import VisionLanguageModel
from .projector import MLPProjector
from .sharding import MultimodalShardPlan, plan_multimodal_shards, sp_order, split_frames
from .vision import PatchViT

__all__ = ["VisionLanguageModel", "MLPProjector", "PatchViT", "MultimodalShardPlan", "plan_multimodal_shards",
           "sp_order", "split_frames"]
