"""Training data for the multimodal trainer: video decoding and frame sampling (video.py), jsonl
video-text datasets with chat templates and packing (vlm_data.py). Importing it loads neither PyAV nor
transformers; they are imported on first use."""
from .video import VideoError, load_frames, read_frame_folder, read_video, uniform_indices, write_video
from .vlm_data import VLMData, VLMSample, collate_identity, image_token_id, load_image_processor, load_tokenizer

__all__ = ["VideoError", "load_frames", "read_frame_folder", "read_video", "uniform_indices", "write_video",
           "VLMData", "VLMSample", "collate_identity", "image_token_id", "load_image_processor",
           "load_tokenizer"]
