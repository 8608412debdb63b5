"""Video frames for training: PyAV decoding of a video file or reading a folder of frame images, with
F frames sampled uniformly over the clip.

| function | returns |
|---|---|
| `uniform_indices(total, F)` | F frame numbers spread evenly over [0, total) (first and last included) |
| `read_video(path, F)` | list of F RGB uint8 arrays (H, W, 3), decoded with PyAV |
| `read_frame_folder(path, F)` | the same from a folder of images (sorted by name), read with Pillow |
| `load_frames(path, F)` | either, by what `path` is |
| `write_video(path, frames, fps)` | an mp4 (H.264) from uint8 frames: test assets and NIAH haystacks |

Errors are `VideoError` (a ValueError): the file is missing, cannot be decoded, or holds fewer than F
frames. The caller (vlm_data.py) adds the jsonl file and line. Not here: resizing and normalising
(the vision tower's image processor does that), tokenisation, packing.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["VideoError", "IMAGE_SUFFIXES", "uniform_indices", "read_video", "read_frame_folder", "load_frames",
           "write_video"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class VideoError(ValueError):
    """A video or frame folder that cannot give the frames asked for."""


def uniform_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` frame numbers evenly spread over `total` frames, first and last included
    (round(linspace(0, total - 1, F)), LongVILA's sampling). Needs 1 <= F <= total."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total < num_frames:
        raise VideoError(f"it has {total} frame(s), fewer than the {num_frames} asked for")
    if num_frames == 1:
        return [0]
    return [int(round(i * (total - 1) / (num_frames - 1))) for i in range(num_frames)]


def _count_frames(path: str) -> int:
    """Frames in the first video stream: the container's count when it has one, else a decode pass."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


def read_video(path: str, num_frames: int) -> list[np.ndarray]:
    """F uniformly sampled frames of the video at `path` as RGB uint8 arrays (H, W, 3)."""
    import av

    if not os.path.isfile(path):
        raise VideoError(f"video file {path} does not exist")
    try:
        total = _count_frames(path)
        wanted = uniform_indices(total, num_frames)
        wanted_set, picked, last = set(wanted), {}, wanted[-1]
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted_set:
                    picked[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except VideoError as exc:
        raise VideoError(f"video {path} is too short: {exc}") from None
    except (av.FFmpegError, IndexError, OSError, UnicodeDecodeError) as exc:
        raise VideoError(f"video {path} cannot be decoded ({type(exc).__name__}: {exc})") from None
    if len(picked) != len(wanted_set):
        # The container promised `total` frames but fewer decoded: a truncated or damaged file.
        raise VideoError(f"video {path} is too short or damaged: its header counts {total} frames but only "
                         f"{len(picked)} of the {num_frames} sampled ones decoded")
    return [picked[i] for i in wanted]


def read_frame_folder(path: str, num_frames: int) -> list[np.ndarray]:
    """F uniformly sampled images (sorted by file name) of the folder `path` as RGB uint8 arrays."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(path):
        raise VideoError(f"frame folder {path} does not exist")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
    try:
        wanted = uniform_indices(len(names), num_frames)
    except VideoError as exc:
        raise VideoError(f"frame folder {path} is too short: {exc} (image files: {', '.join(IMAGE_SUFFIXES)})") \
            from None
    frames = []
    for i in wanted:
        file = os.path.join(path, names[i])
        try:
            with Image.open(file) as img:
                frames.append(np.asarray(img.convert("RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise VideoError(f"frame image {file} cannot be read ({type(exc).__name__}: {exc})") from None
    if len({f.shape for f in frames}) > 1:
        raise VideoError(f"frame folder {path} mixes image sizes {sorted({f.shape for f in frames})}")
    return frames


def load_frames(path: str, num_frames: int) -> list[np.ndarray]:
    """A folder of images or a video file, by what `path` is."""
    if os.path.isdir(path):
        return read_frame_folder(path, num_frames)
    return read_video(path, num_frames)


def write_video(path: str, frames, fps: int = 8, *, lossless: bool = False) -> None:
    """Encode uint8 RGB frames (N, H, W, 3) (even H and W) as an H.264 mp4 with PyAV.

    lossless: libx264rgb at qp 0 (bit-exact RGB; for evaluations that compare pixels), else yuv420p at
    crf 18."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {frames.shape[1]} x {frames.shape[2]}")
    with av.open(path, mode="w") as container:
        if lossless:
            stream = container.add_stream("libx264rgb", rate=fps)
            stream.pix_fmt, stream.options = "rgb24", {"qp": "0", "preset": "ultrafast"}
        else:
            stream = container.add_stream("libx264", rate=fps)
            stream.pix_fmt, stream.options = "yuv420p", {"crf": "18", "preset": "ultrafast"}
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
