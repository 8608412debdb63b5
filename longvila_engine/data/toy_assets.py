"""Small offline video-text assets for the multimodal trainer's tests and `make demo`: nothing is downloaded.

`build_assets(root)` writes, under `root`:
- `llm/`: a tiny random Qwen2ForCausalLM (save_pretrained) and its tokenizer: a byte-level BPE trained
  with the `tokenizers` library on the dataset's own words, saved in transformers format with a
  ChatML chat template and an `<image>` special token;
- `vision/`: a tiny random SiglipVisionModel (32 x 32 frames, 8 x 8 patches: 16 patch tokens) and its
  `preprocessor_config.json` (SiglipImageProcessor: resize to 32 x 32, mean 0.5, std 0.5);
- `videos/*.mp4` (PyAV, H.264) and `frames/*/NNN.png` (Pillow): a coloured square crossing a grey
  background, left-to-right or right-to-left;
- `data.jsonl`: rows mixing videos (LLaVA `conversations`), frame folders (`prompt`/`answer`) and
  text-only rows. Answers name the colour and the direction, so the loss can fall.

Deterministic in `seed` (and independent of `root`). Sizes: hidden 64, 2 layers; a few seconds to build.
Not here: anything a real run needs; these are toys that show the data path and MM-SP end to end.
"""
from __future__ import annotations

import json
import os

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
TEXT_ROWS = [("What is two plus two?", "Four."), ("Name a colour.", "Red."), ("Say hello.", "Hello there."),
             ("Which way is left?", "Left is left.")]


def clip_frames(colour: str, direction: str, num_frames: int = 12, size: int = 64) -> np.ndarray:
    """(N, size, size, 3) uint8: a square of `colour` moving across a grey background."""
    frames = np.full((num_frames, size, size, 3), 128, dtype=np.uint8)
    side = size // 4
    for t in range(num_frames):
        x = int(round(t * (size - side) / max(num_frames - 1, 1)))
        if direction == "left":
            x = size - side - x
        y = size // 2 - side // 2
        frames[t, y:y + side, x:x + side] = COLOURS[colour]
    return frames


def build_tokenizer(path: str, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<image>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_llm(path: str, vocab_size: int, seed: int, hidden: int = 64) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, attention_dropout=0.0, use_sliding_window=False)
    Qwen2ForCausalLM(cfg).save_pretrained(path)


def build_vision(path: str, seed: int) -> None:
    import torch
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8, attention_dropout=0.0)
    SiglipVisionModel(cfg).save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        path)


def write_clip_folder(path: str, frames: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(os.path.join(path, f"{t:03d}.png"))


def build_assets(root: str, *, seed: int = 0, num_rows: int = 12) -> dict:
    """Write every asset under `root`; returns their paths {llm, vision, data, videos, folders}."""
    import logging

    from longvila_engine.data.video import write_video

    logging.getLogger("transformers").setLevel(logging.ERROR)
    rng = np.random.default_rng(seed)
    paths = {k: os.path.join(root, k) for k in ("llm", "vision", "videos", "frames")}
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    rows, videos, folders = [], [], []
    for i in range(num_rows):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        direction = ["left", "right"][int(rng.integers(2))]
        answer = f"A {colour} square moves {direction}."
        kind = i % 3
        if kind == 0:
            name = f"clip{i:02d}.mp4"
            write_video(os.path.join(paths["videos"], name), clip_frames(colour, direction))
            videos.append(os.path.join(paths["videos"], name))
            rows.append({"video": f"videos/{name}", "conversations": [
                {"from": "human", "value": "<video>\nWhat moves, and where?"}, {"from": "gpt", "value": answer}]})
        elif kind == 1:
            folder = os.path.join(paths["frames"], f"clip{i:02d}")
            write_clip_folder(folder, clip_frames(colour, direction, num_frames=8))
            folders.append(folder)
            rows.append({"video": folder, "prompt": "Describe the clip. <video>", "answer": answer})
        else:
            q, a = TEXT_ROWS[i // 3 % len(TEXT_ROWS)]
            rows.append({"prompt": q, "answer": a})
    data = os.path.join(root, "data.jsonl")
    with open(data, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    # The tokenizer's corpus holds no path, so it (and the model's vocabulary) does not depend on `root`.
    texts = [t["value"] for r in rows for t in r.get("conversations", [])] + [r.get("prompt", "") for r in rows]
    corpus = texts + [f"A {c} square moves {d}." for c in COLOURS for d in ("left", "right")]
    corpus += ["user assistant system What moves, and where? Describe the clip."] + [q + " " + a for q, a in TEXT_ROWS]
    tok = build_tokenizer(paths["llm"], corpus)
    build_llm(paths["llm"], len(tok), seed)
    build_vision(paths["vision"], seed + 1)
    return {"llm": paths["llm"], "vision": paths["vision"], "data": data, "videos": videos, "folders": folders,
            "root": root}
