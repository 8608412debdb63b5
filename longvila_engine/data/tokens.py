"""Token data of the text trainer: synthetic learnable sequences and tokenised .npy / .bin files, and the
global batch of a step chosen by the running sample index (so a resumed run sees exactly the samples
an uninterrupted one would; the index is saved in the checkpoint, see elastic.py).

Deliberately not here: the video-text data (vlm_data.py) and the sharding of a batch over ranks
(models.local_batch)."""
from __future__ import annotations

import os

import torch

from ..models import get_config


class SyntheticTokens:
    """Deterministic learnable sequences over a fixed set of `alphabet` token ids: a random start, then
    next = succ[token] for one fixed random cycle through the set. The loss falls fast (first to the
    set's entropy, then towards 0 as the bigram is learned), which is what smoke tests need."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, alphabet: int = 32):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randperm(vocab_size, generator=gen)[: min(alphabet, vocab_size)]
        self.succ = {int(a): int(b) for a, b in zip(ids, ids.roll(-1))}
        self.ids = ids

    def sample(self, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        token = int(self.ids[int(torch.randint(0, len(self.ids), (1,), generator=gen))])
        out = []
        for _ in range(self.seq_len):
            out.append(token)
            token = self.succ[token]
        return torch.tensor(out, dtype=torch.long)


class TokenFile:
    """Windows of `seq_len` tokens at seeded offsets of a flat token file (.npy, or raw .bin of `dtype`)."""

    def __init__(self, path: str, vocab_size: int, seq_len: int, seed: int = 0, dtype: str = "uint16"):
        import numpy as np

        if not os.path.exists(path):
            raise ValueError(
                f"--data {path!r} does not exist (use 'synthetic' or a tokenised .npy/.bin file)"
            )
        self.tokens = (
            np.load(path, mmap_mode="r") if path.endswith(".npy") else np.memmap(path, dtype=dtype, mode="r")
        )
        self.tokens = self.tokens.reshape(-1)
        if self.tokens.shape[0] < seq_len:
            raise ValueError(f"{path} holds {self.tokens.shape[0]} tokens, fewer than --seq-len {seq_len}")
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def __len__(self) -> int:
        """Samples per epoch: the file's tokens in whole windows (the epoch count in checkpoints)."""
        return self.tokens.shape[0] // self.seq_len

    def sample(self, index: int) -> torch.Tensor:
        import numpy as np

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        start = int(torch.randint(0, self.tokens.shape[0] - self.seq_len + 1, (1,), generator=gen))
        window = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len]).astype(np.int64))
        if int(window.max()) >= self.vocab_size or int(window.min()) < 0:
            raise ValueError(
                f"token ids in {index=} fall outside the model's vocabulary [0, {self.vocab_size})"
            )
        return window


def build_data(args, vocab_size: int | None = None):
    """The data source of `--data`; token ids in [0, vocab_size) (default: `--model`'s vocabulary)."""
    vocab = vocab_size if vocab_size is not None else get_config(args.model).vocab_size
    if args.data == "synthetic":
        return SyntheticTokens(vocab, args.seq_len, args.seed)
    return TokenFile(args.data, vocab, args.seq_len, args.seed, args.data_dtype)


def global_batch(data, sample_index: int, batch_size: int, groups) -> torch.Tensor:
    """(batch_size/dp, S) token ids of this dp replica for the global batch that starts at `sample_index`:
    samples sample_index + dp_rank*local + i. The trainer advances sample_index by batch_size per step
    and keeps it in checkpoints (`elastic.DataPosition`), so a resume continues the same sample stream."""
    dp = groups.dp_size if groups is not None else 1
    if batch_size % dp:
        raise ValueError(f"--batch {batch_size} must be a multiple of dp={dp}")
    local = batch_size // dp
    first = sample_index + (groups.dp_rank if groups is not None else 0) * local
    return torch.stack([data.sample(first + i) for i in range(local)])
