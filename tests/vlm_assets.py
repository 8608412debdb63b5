"""Offline assets for the multimodal tests: the builder lives in the package
(`longvila_engine.data.toy_assets`) so that `make demo` uses the very same files."""
from longvila_engine.data.toy_assets import COLOURS, build_assets, clip_frames

__all__ = ["COLOURS", "build_assets", "clip_frames"]
