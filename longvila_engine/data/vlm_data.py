"""Video-text training data from a jsonl file: parsing, chat template, packing, frame decoding.

One JSON object per line:

    {"video": "clips/a.mp4", "conversations": [{"from": "human", "value": "<video>\\nWhat moves?"},
                                               {"from": "gpt", "value": "A red ball."}]}
    {"video": "frames/b/", "prompt": "<video> Describe it.", "answer": "Noise."}      # folder of images
    {"prompt": "Say hi.", "answer": "hi"}                                              # text only

`video` (alias `frames`) is a video file or a folder of frame images, relative to the jsonl file or
absolute. A row with a video needs exactly one `<video>` marker in its human turns; a row without one
must not have it. Roles: human/user, gpt/assistant, system.

Two phases:

1. Index (`VLMData(...)`, the same on every rank, text only): parse every line, apply the LLM
   tokenizer's chat template (transformers `AutoTokenizer`, local files), and supervise only the
   assistant turns (their template text included, so the model learns to end its turn). The marker
   becomes the tokenizer's image token, expanded to one placeholder per frame (`VisionLanguageModel`
   turns each into the projector's P tokens). A sample's length is text tokens + frames * P. Samples
   longer than `seq_len` are truncated by frames when `truncate_frames` (fewer frames, still sampled
   over the whole clip) or else skipped and counted; text is never cut (text alone too long: skipped
   and counted). Samples are then packed greedily, in file order, into packs of at most `seq_len`.
2. Load (`data[pack]`, in DataLoader workers): decode each sample's frames (video.py), preprocess them
   with the vision tower's image processor (`preprocessor_config.json`: size, mean, std), and return
   the pack as one global sample for `VisionLanguageModel` (ids, labels, `cu_seqlens`, frames).

Bad input (a non-JSON line, a row without the marker, a missing, corrupt or too-short video) raises
`ValueError` naming the file and line, the value and the fix; with `skip_bad=True` the sample is
dropped and recorded in the pack's `skipped` list instead (the trainer counts and logs them). Every
rank of a job builds the same packs from the same file, so they raise the same error.
Not here: the model, sharding, the training loop.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .video import VideoError, load_frames

__all__ = ["VLMSample", "VLMData", "load_tokenizer", "load_image_processor", "image_token_id", "collate_identity"]

IGNORE_INDEX = -100
MARKER = "<video>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def load_tokenizer(path: str):
    """The LLM's tokenizer from its local files (AutoTokenizer; never the hub)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--llm {path}: no usable tokenizer files there ({type(exc).__name__}: {exc}); the "
                         f"folder needs tokenizer.json / tokenizer_config.json as save_pretrained writes them") \
            from None


def load_image_processor(path: str):
    """The vision tower's image processor from `preprocessor_config.json` (AutoImageProcessor, local)."""
    import logging

    from transformers import AutoImageProcessor

    if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        raise ValueError(f"--vision {path}: preprocessor_config.json is missing; save the tower's image "
                         f"processor next to it (processor.save_pretrained(path))")
    # transformers notes once that it uses the Pillow backend when torchvision is absent: not a problem.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return AutoImageProcessor.from_pretrained(path, local_files_only=True)


def image_token_id(tokenizer, token: str) -> int:
    """The id of `token`, which must be one token of `tokenizer` (the frame placeholder)."""
    ids = tokenizer.convert_tokens_to_ids([token])
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or ids[0] is None or ids[0] == unk or len(tokenizer(token, add_special_tokens=False).input_ids) != 1:
        raise ValueError(f"the tokenizer has no single token {token!r} for image placeholders; add it as a "
                         f"special token (tokenizer.add_special_tokens) or pass --image-token with one it has")
    return int(ids[0])


def collate_identity(pack):
    """DataLoader collate for batch_size=None loaders: the pack dict as the dataset made it."""
    return pack


@dataclass
class VLMSample:
    """One indexed row: ids with ONE image placeholder (expanded to `num_frames` when loaded)."""

    line: int
    ids: list[int]
    labels: list[int]
    source: str | None
    num_frames: int
    length: int  # LM tokens: text + num_frames * tokens_per_frame
    truncated_from: int | None = None


@dataclass
class IndexReport:
    rows: int = 0
    skipped: list = field(default_factory=list)  # (line, reason)
    truncated: int = 0


class VLMData(torch.utils.data.Dataset):
    """Packs of a jsonl dataset; `data[i]` loads pack i (see the module docstring)."""

    def __init__(self, path: str, tokenizer, image_processor, *, num_frames: int, seq_len: int,
                 tokens_per_frame: int, image_token: str = "<image>", truncate_frames: bool = False,
                 skip_bad: bool = False, min_frames: int = 1):
        if num_frames < 1 or seq_len < 1 or tokens_per_frame < 1:
            raise ValueError(f"num_frames={num_frames}, seq_len={seq_len}, tokens_per_frame={tokens_per_frame} "
                             f"must all be >= 1")
        self.path, self.tokenizer, self.image_processor = os.path.abspath(path), tokenizer, image_processor
        self.num_frames, self.seq_len, self.tokens_per_frame = num_frames, seq_len, tokens_per_frame
        self.truncate_frames, self.skip_bad, self.min_frames = truncate_frames, skip_bad, min_frames
        self.image_token = image_token
        self.image_token_id = image_token_id(tokenizer, image_token)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the LLM's tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                             "chat_template.jinja); add one so prompts are formatted as in the model's training")
        self.report = IndexReport()
        self.samples = self._index()
        self.packs = self._pack()
        if not self.packs:
            raise ValueError(f"{self.path}: no usable sample ({len(self.report.skipped)} skipped: "
                             f"{self.report.skipped[:3]}...); nothing to train on")

    # --- index --------------------------------------------------------------------------------------
    def _where(self, line: int) -> str:
        return f"{self.path}, line {line}"

    def _bad(self, line: int, message: str) -> None:
        """A bad row: raise (strict) or record the skip."""
        if not self.skip_bad:
            raise ValueError(f"{self._where(line)}: {message} (or pass --skip-bad-samples to skip such rows)")
        self.report.skipped.append((line, message))

    def _messages(self, row: dict, line: int) -> list[dict] | None:
        if "conversations" in row:
            conv = row["conversations"]
            if not isinstance(conv, list) or not conv:
                return self._bad(line, "'conversations' must be a non-empty list of {from, value} objects")
            messages = []
            for turn in conv:
                role = _ROLES.get(turn.get("from", turn.get("role")) if isinstance(turn, dict) else None)
                value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
                if role is None or not isinstance(value, str):
                    return self._bad(line, f"turn {turn!r} needs 'from' (human/gpt/system) and a string 'value'")
                messages.append({"role": role, "content": value})
            return messages
        if isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str):
            return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["answer"]}]
        return self._bad(line, f"the row needs 'conversations' or 'prompt' and 'answer' strings; it has keys "
                               f"{sorted(row)}")

    def _tokenize(self, messages: list[dict], line: int):
        """(ids, labels): template segments tokenised one by one, assistant segments supervised."""
        tok = self.tokenizer
        render = lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        segments, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = render(messages[:i], True), render(messages[:i + 1], False)
            if not (before.startswith(done) and through.startswith(before)):
                raise ValueError(f"{self._where(line)}: the chat template does not render conversations "
                                 f"prefix-by-prefix, so answers cannot be located; use a ChatML-like template")
            segments += [(before[len(done):], False), (through[len(before):], True)]
            done = through
        if not segments:
            return self._bad(line, "the conversation has no gpt/assistant turn: nothing to supervise")
        full = render(messages, False)
        segments.append((full[len(done):], False))
        ids, labels = [], []
        for text, supervised in segments:
            if not text:
                continue
            piece = tok(text, add_special_tokens=False).input_ids
            ids += piece
            labels += piece if supervised else [IGNORE_INDEX] * len(piece)
        return ids, labels

    def _index(self) -> list[VLMSample]:
        samples, base = [], os.path.dirname(self.path)
        if not os.path.isfile(self.path):
            raise ValueError(f"--data {self.path} does not exist (a .jsonl file, one JSON object per line)")
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            self.report.rows += 1
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                self._bad(number, f"not valid JSON ({exc.msg} at column {exc.colno}); each line must be one "
                                  f"JSON object")
                continue
            if not isinstance(row, dict):
                self._bad(number, f"a line must be a JSON object, got {type(row).__name__}")
                continue
            sample = self._index_row(row, number, base)
            if sample is not None:
                samples.append(sample)
        return samples

    def _index_row(self, row: dict, line: int, base: str) -> VLMSample | None:
        source = row.get("video", row.get("frames"))
        if source is not None and not isinstance(source, str):
            return self._bad(line, f"'video' must be a path string, got {source!r}")
        messages = self._messages(row, line)
        if messages is None:
            return None
        markers = sum(m["content"].count(MARKER) for m in messages)
        in_user = sum(m["content"].count(MARKER) for m in messages if m["role"] == "user")
        if source is not None and (markers != 1 or in_user != 1):
            return self._bad(line, f"the row has video {source!r} but {markers} '{MARKER}' marker(s); put exactly "
                                   f"one '{MARKER}' in a human turn where the frames go")
        if source is None and markers:
            return self._bad(line, f"the row has a '{MARKER}' marker but no 'video' (file or frame folder)")
        if any(self.image_token in m["content"] for m in messages):
            return self._bad(line, f"the text contains the image token {self.image_token!r} itself")
        messages = [{**m, "content": m["content"].replace(MARKER, self.image_token)} for m in messages]
        tokens = self._tokenize(messages, line)
        if tokens is None:
            return None
        ids, labels = tokens
        text_len = len(ids) - (1 if source is not None else 0)
        frames = self.num_frames if source is not None else 0
        length = text_len + frames * self.tokens_per_frame
        truncated_from = None
        if length > self.seq_len:
            room = (self.seq_len - text_len) // self.tokens_per_frame
            if source is not None and self.truncate_frames and room >= self.min_frames:
                truncated_from, frames = frames, room
                length = text_len + frames * self.tokens_per_frame
                self.report.truncated += 1
            else:
                # Too long is not an error: it is a property of --seq-len. Skipped and counted, never cut.
                what = "its text alone" if text_len > self.seq_len or source is None else \
                    f"{frames} frames x {self.tokens_per_frame} tokens + {text_len} text tokens"
                self.report.skipped.append((line, f"too long for --seq-len {self.seq_len}: {what} = {length} "
                                                  f"tokens" + ("" if source is None else
                                                               " (--truncate-frames drops frames instead)")))
                return None
        if source is not None and not os.path.isabs(source):
            source = os.path.normpath(os.path.join(base, source))
        return VLMSample(line, ids, labels, source, frames, length, truncated_from)

    def _pack(self) -> list[list[int]]:
        packs, current, used = [], [], 0
        for i, s in enumerate(self.samples):
            if current and used + s.length > self.seq_len:
                packs.append(current)
                current, used = [], 0
            current.append(i)
            used += s.length
        if current:
            packs.append(current)
        return packs

    # --- load -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.packs)

    def frames_of(self, sample: VLMSample) -> torch.Tensor:
        """(F, 3, H, W) float32 frames of a sample, decoded and preprocessed (raises VideoError)."""
        arrays = load_frames(sample.source, sample.num_frames)
        pixels = self.image_processor(images=arrays, return_tensors="pt")["pixel_values"]
        return pixels.to(torch.float32)

    def __getitem__(self, index: int) -> dict:
        """Pack `index` as one global sample: input_ids/labels (L,) with one placeholder per frame,
        cu_seqlens (K+1,) offsets into input_ids, frames (N, 3, H, W) or None, tokens (LM length),
        lines (the jsonl lines packed), skipped [(line, reason)]."""
        ids, labels, cu, frames, lines, skipped, tokens = [], [], [0], [], [], [], 0
        for i in self.packs[index % len(self.packs)]:
            s = self.samples[i]
            pixels = None
            if s.source is not None:
                try:
                    pixels = self.frames_of(s)
                except VideoError as exc:
                    reason = f"{self._where(s.line)}: {exc}"
                    if not self.skip_bad:
                        raise ValueError(f"{reason} (fix or remove the row, or pass --skip-bad-samples)") from None
                    skipped.append((s.line, str(exc)))
                    continue
                frames.append(pixels)
            at = s.ids.index(self.image_token_id) if pixels is not None else len(s.ids)
            n = 0 if pixels is None else s.num_frames
            ids += s.ids[:at] + [self.image_token_id] * n + s.ids[at + 1:]
            labels += s.labels[:at] + [IGNORE_INDEX] * n + s.labels[at + 1:]
            cu.append(len(ids))
            lines.append(s.line)
            tokens += s.length
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
                "frames": torch.cat(frames) if frames else None, "tokens": tokens, "lines": lines,
                "skipped": skipped, "pack": index % len(self.packs)}
