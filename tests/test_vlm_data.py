"""The video-text data path (longvila_engine/data): PyAV decoding and uniform sampling, frame folders,
jsonl parsing, chat template and answer-only supervision, frame preprocessing from the tower's
preprocessor_config.json, packing, too-long samples, and every bad input's error (file and line).

Assets are built offline by tests/vlm_assets.py (tiny tokenizer trained with `tokenizers`, tiny
SigLIP image processor, mp4s written with PyAV).
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from vlm_assets import build_assets, clip_frames

from longvila_engine.data import (
    VideoError,
    VLMData,
    load_image_processor,
    load_tokenizer,
    read_frame_folder,
    read_video,
    uniform_indices,
    write_video,
)

TOKENS_PER_FRAME = 4  # 32 x 32 frames, 8 x 8 patches, 2 x 2 merging


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_assets")
    a = build_assets(str(root))
    a["tokenizer"] = load_tokenizer(a["llm"])
    a["processor"] = load_image_processor(a["vision"])
    return a


def _data(assets, path=None, **kw):
    opts = {"num_frames": 4, "seq_len": 128, "tokens_per_frame": TOKENS_PER_FRAME, **kw}
    return VLMData(path or assets["data"], assets["tokenizer"], assets["processor"], **opts)


def _write_jsonl(dirname, rows) -> str:
    path = os.path.join(dirname, "rows.jsonl")
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def test_uniform_indices():
    assert uniform_indices(10, 4) == [0, 3, 6, 9]
    assert uniform_indices(5, 5) == [0, 1, 2, 3, 4]
    assert uniform_indices(7, 1) == [0]
    with pytest.raises(VideoError, match="fewer than the 6"):
        uniform_indices(5, 6)


def test_video_decoding_picks_uniform_frames(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    path = str(tmp_path / "noise.mp4")
    write_video(path, frames, lossless=True)  # bit-exact RGB, so the chosen frames are identifiable
    got = read_video(path, 4)
    assert len(got) == 4
    for array, index in zip(got, [0, 3, 6, 9]):
        assert array.shape == (32, 32, 3) and np.array_equal(array, frames[index])


def test_frame_folder_is_sorted_and_sampled(assets):
    folder = assets["folders"][0]
    got = read_frame_folder(folder, 3)
    name = os.path.basename(folder)
    source = sorted(os.listdir(folder))
    assert len(source) == 8 and name.startswith("clip")
    from PIL import Image

    for array, index in zip(got, [0, 4, 7]):  # round(linspace(0, 7, 3)) = 0, 3.5 -> 4, 7
        assert np.array_equal(array, np.asarray(Image.open(os.path.join(folder, source[index])).convert("RGB")))


def test_index_supervises_answers_only_and_packs(assets):
    data = _data(assets)
    tok = assets["tokenizer"]
    assert data.report.rows == 12 and not data.report.skipped
    assert len(data.samples) == 12 and all(s.length <= 128 for s in data.samples)
    for pack_index in range(len(data)):
        pack = data[pack_index]
        ids, labels, cu = pack["input_ids"], pack["labels"], pack["cu_seqlens"].tolist()
        assert pack["tokens"] <= 128 and cu[0] == 0 and cu[-1] == ids.numel() == labels.numel()
        placeholders = int((ids == data.image_token_id).sum())
        assert pack["frames"] is None or tuple(pack["frames"].shape) == (placeholders, 3, 32, 32)
        assert pack["tokens"] == ids.numel() + placeholders * (TOKENS_PER_FRAME - 1)
        assert not (labels[ids == data.image_token_id] >= 0).any()  # frames are never targets
        for k, line in enumerate(pack["lines"]):
            row = json.loads(open(assets["data"]).read().splitlines()[line - 1])
            answer = row["answer"] if "answer" in row else row["conversations"][1]["value"]
            seg = labels[cu[k]:cu[k + 1]]
            # Exactly the answer and the template's end of turn are supervised, nothing of the prompt.
            assert tok.decode(seg[seg >= 0]) == answer + "<|im_end|>\n"
            prompt = tok.decode(ids[cu[k]:cu[k + 1]][seg < 0])
            assert "<|im_start|>user" in prompt and answer not in prompt


def test_frames_use_the_processor_config(assets, tmp_path):
    # A grey (128) background pixel through SigLIP's rescale 1/255, mean 0.5, std 0.5.
    data = _data(assets)
    pack = data[0]
    want = (128 / 255 - 0.5) / 0.5
    assert abs(float(pack["frames"][0, 0, 0, 0]) - want) < 0.02  # H.264 (lossy) video pixel
    folder_row = [i for i, s in enumerate(data.samples) if s.source and os.path.isdir(s.source)][0]
    frames = data.frames_of(data.samples[folder_row])
    assert abs(float(frames[0, 0, 0, 0]) - want) < 1e-6  # PNG frames are exact
    # Another mean/std in preprocessor_config.json changes the pixels accordingly.
    vision = tmp_path / "vision"
    shutil.copytree(assets["vision"], vision)
    cfg = json.loads((vision / "preprocessor_config.json").read_text())
    cfg.update(image_mean=[0.0] * 3, image_std=[1.0] * 3)
    (vision / "preprocessor_config.json").write_text(json.dumps(cfg))
    other = VLMData(assets["data"], assets["tokenizer"], load_image_processor(str(vision)), num_frames=4,
                    seq_len=128, tokens_per_frame=TOKENS_PER_FRAME)
    assert abs(float(other.frames_of(data.samples[folder_row])[0, 0, 0, 0]) - 128 / 255) < 1e-6


def test_too_long_is_skipped_or_truncated_by_frames(assets, tmp_path):
    video = assets["videos"][0]
    rows = [{"video": video, "prompt": "<video> Describe.", "answer": "A red square moves left."},
            {"prompt": "word " * 200, "answer": "ok"}, {"prompt": "Say hello.", "answer": "Hello there."}]
    path = _write_jsonl(str(tmp_path), rows)
    skipped = _data(assets, path, num_frames=12, seq_len=60)
    assert [line for line, _ in skipped.report.skipped] == [1, 2]
    assert "too long for --seq-len 60" in skipped.report.skipped[0][1]
    assert "text alone" in skipped.report.skipped[1][1]
    truncated = _data(assets, path, num_frames=12, seq_len=60, truncate_frames=True)
    s = truncated.samples[0]
    assert truncated.report.truncated == 1 and s.truncated_from == 12 and 1 <= s.num_frames < 12
    assert s.length <= 60 and s.length + TOKENS_PER_FRAME > 60  # as many frames as fit
    assert [line for line, _ in truncated.report.skipped] == [2]  # text is never cut
    pack = truncated[0]
    assert pack["frames"].shape[0] == s.num_frames and pack["lines"] == [1]


BAD_ROWS = {
    "not_json": ('{"prompt": "hi", "answer": ', "not valid JSON"),
    "no_marker": ({"video": "VIDEO", "prompt": "Describe.", "answer": "x"}, "0 '<video>' marker"),
    "marker_without_video": ({"prompt": "<video> Describe.", "answer": "x"}, "marker but no 'video'"),
    "missing_video": ({"video": "nowhere.mp4", "prompt": "<video>", "answer": "x"}, "does not exist"),
    "corrupt_video": ({"video": "CORRUPT", "prompt": "<video>", "answer": "x"}, "cannot be decoded"),
    "too_short_video": ({"video": "VIDEO", "prompt": "<video>", "answer": "x"}, "too short"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_input_names_file_and_line(assets, tmp_path, case):
    row, message = BAD_ROWS[case]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    if isinstance(row, dict):
        row = {k: (assets["videos"][0] if v == "VIDEO" else str(corrupt) if v == "CORRUPT" else v)
               for k, v in row.items()}
    good = {"prompt": "Say hello.", "answer": "Hello there."}
    path = _write_jsonl(str(tmp_path), [good, row, good])
    num_frames = 20 if case == "too_short_video" else 4  # the clips hold 12 frames
    with pytest.raises(ValueError) as info:
        data = _data(assets, path, num_frames=num_frames, seq_len=512)
        for i in range(len(data)):
            data[i]
    text = str(info.value)
    assert f"{path}, line 2" in text and message in text and "--skip-bad-samples" in text
    # Skip mode: the bad row is counted (at indexing or at loading), the good rows remain.
    data = _data(assets, path, num_frames=num_frames, seq_len=512, skip_bad=True)
    skipped = [line for line, _ in data.report.skipped]
    for i in range(len(data)):
        skipped += [line for line, _ in data[i]["skipped"]]
    assert skipped == [2]
    assert sum(len(data[i]["lines"]) for i in range(len(data))) == 2


def test_clip_assets_move():
    right, left = clip_frames("red", "right"), clip_frames("red", "left")
    assert np.array_equal(right[0], left[-1]) and not np.array_equal(right[0], right[-1])
    assert torch.tensor(right).dtype == torch.uint8


def test_processor_size_must_fit_the_tower(assets):
    from longvila_engine.train_vlm import check_processor_size

    check_processor_size(assets["processor"], 32, assets["vision"])  # SigLIP asset: 32 x 32 frames
    with pytest.raises(ValueError, match="expects 64 x 64; fix 'size' in preprocessor_config.json"):
        check_processor_size(assets["processor"], 64, assets["vision"])


def test_image_token_must_be_one_token(assets):
    from longvila_engine.data import image_token_id

    assert image_token_id(assets["tokenizer"], "<image>") == assets["tokenizer"].convert_tokens_to_ids("<image>")
    with pytest.raises(ValueError, match="no single token '<frame>'"):
        _data(assets, image_token="<frame>")
