"""`build_dataset`: the one entry point from a recipe's `data:` section to a map-style dataset.

Every sample is a dict of (seq_len,) tensors: input_ids, labels (-100 = no loss),
position_ids, doc_ids (plus answer_mask for the needle task). `collate` stacks them.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

from .keymap import KeymapTask
from .needle import NeedleTask
from .packing import PackedStream
from .sources import _as_paths, iter_jsonl, iter_text, load_memmap, split_on_eos
from .tokenizer import load_tokenizer

SOURCES = ("needle", "keymap", "jsonl", "text", "memmap")

# The train and eval splits of a file source come from one packed stream: keep the last one so
# that building the eval split right after the train split does not tokenize the corpus again.
_last_stream: tuple = (None, None)


class TaskDataset(torch.utils.data.Dataset):
    """`num_samples` samples of a synthetic task (NeedleTask, KeymapTask: anything with `sample(i)`);
    non-tensor values (the needle's answer string) stay out, keeping the batch all tensors."""

    def __init__(self, task, num_samples: int):
        self.task, self.num_samples = task, int(num_samples)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        return {k: v for k, v in self.task.sample(i).items() if torch.is_tensor(v)}


class PackedDataset(torch.utils.data.Dataset):
    """Sequences [start, stop) of a packed document stream, built on access."""

    def __init__(self, stream: PackedStream, start: int, stop: int):
        assert 0 <= start <= stop <= len(stream)
        self.stream, self.start, self.stop = stream, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        return self.stream.sequence(self.start + i).to_dict()


def build_dataset(
    source: str,
    *,
    tokenizer,
    seq_len: int,
    split: str,
    paths: Sequence[str] = (),
    text_field: str = "text",
    memmap_dtype: str = "uint16",
    eval_fraction: float = 0.05,
    num_samples: int = 100_000,
    needle_kwargs: Optional[dict] = None,
    keymap_kwargs: Optional[dict] = None,
    seed: int = 0,
) -> torch.utils.data.Dataset:
    """A map-style dataset for split "train" or "eval".

    tokenizer: a tokenizer object or a spec for `load_tokenizer` ("byte" or a tokenizer.json path).
    needle: `num_samples` training samples; eval has ceil(eval_fraction * num_samples) samples
        from a separate seed stream (never the training ones). needle_kwargs: n_keys,
        value_digits, loss_on.
    keymap: the same sizes as needle; keymap_kwargs: task, n_keys (see data/keymap.py).
    jsonl/text/memmap: documents are tokenized (memmap: split on eos), packed, and the last
        eval_fraction of the packed sequences (at least one) is the eval split.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: use 'train' or 'eval'")
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r} is unknown; use one of {', '.join(SOURCES)}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"data.eval_fraction={eval_fraction} must be in (0, 1), e.g. 0.05")
    if seq_len < 1:
        raise ValueError(f"data.seq_len={seq_len} must be at least 1")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer

    synthetic = {"needle": (NeedleTask, needle_kwargs), "keymap": (KeymapTask, keymap_kwargs)}
    if source in synthetic:
        if num_samples < 1:
            raise ValueError(f"data.num_samples={num_samples} must be at least 1")
        cls, kwargs = synthetic[source]
        task = cls(tok, seq_len, seed=seed, split=split, **(kwargs or {}))
        n = num_samples if split == "train" else max(1, math.ceil(eval_fraction * num_samples))
        return TaskDataset(task, n)

    global _last_stream
    files = _as_paths(paths, source)
    key = (source, tuple((f, os.path.getmtime(f), os.path.getsize(f)) for f in files), text_field, memmap_dtype, seq_len, repr(tok))
    if _last_stream[0] == key:
        stream = _last_stream[1]
    else:
        stream = _pack_files(source, files, tok, seq_len, text_field, memmap_dtype)
        _last_stream = (key, stream)
    n = len(stream)
    n_eval = max(1, int(n * eval_fraction))
    if n - n_eval < 1:
        raise ValueError(
            f"data.paths hold {len(stream.tokens)} tokens = {n} packed sequence(s) of seq_len={seq_len}: "
            f"too few to hold out eval_fraction={eval_fraction} and still train; add data or lower seq_len"
        )
    return PackedDataset(stream, 0, n - n_eval) if split == "train" else PackedDataset(stream, n - n_eval, n)


def _pack_files(source: str, files: list[str], tok, seq_len: int, text_field: str, memmap_dtype: str) -> PackedStream:
    if source == "memmap":
        docs = []
        for path, arr in zip(files, load_memmap(files, memmap_dtype)):
            if arr.size and int(arr.max()) >= tok.vocab_size:
                raise ValueError(
                    f"{path}: token id {int(arr.max())} >= vocab_size {tok.vocab_size} of {tok!r}; "
                    f"check data.memmap_dtype={memmap_dtype!r} and data.tokenizer"
                )
            docs.extend(split_on_eos(arr, tok.eos_id))
    else:
        texts = iter_jsonl(files, text_field) if source == "jsonl" else iter_text(files)
        docs = (tok.encode(t) for t in texts)
    return PackedStream(docs, seq_len, tok.eos_id, tok.pad_id)


def collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack per-sample tensors into (B, S) tensors; non-tensor values become lists."""
    if not samples:
        raise ValueError("collate got an empty batch")
    keys = samples[0].keys()
    assert all(s.keys() == keys for s in samples), "samples of one batch must have the same fields"
    return {k: torch.stack([s[k] for s in samples]) if torch.is_tensor(samples[0][k]) else [s[k] for s in samples] for k in keys}
