"""Synthetic key -> value lookup tasks for continual learning: forgetting is measurable on CPU in minutes.

Task t is a fixed permutation of `n_keys` letters (a key maps to one value letter), drawn from t
alone, so every split, seed and process agrees on it. A sample is a row of pairs, each
`<t><key>=<value> ` (5 tokens with the byte tokenizer), keys drawn at random:

    [bos] 0c=k 0a=f 0q=b ... 0d=

Labels sit only on the value tokens (keys are random: nothing to learn there); the last pair's value
is the answer (answer_mask), so the trainer's answer accuracy is the task accuracy. Tasks share
their keys and conflict in their values; the tag digit lets a model tell them apart, but trained
on one task at a time it has no reason to keep doing so: that is the forgetting the continual-learning
modes fight.
"""

from __future__ import annotations

import numpy as np
import torch

from .packing import IGNORE_INDEX

PAIR_TOKENS = 5  # tag, key, "=", value, " "
MAX_TASKS = 10  # tags are the digits 0-9


def task_mapping(task: int, n_keys: int) -> np.ndarray:
    """value index of every key index for `task` (a permutation; depends on task and n_keys only)."""
    return np.random.default_rng([7919, task, n_keys]).permutation(n_keys)


class KeymapTask:
    def __init__(self, tokenizer, seq_len: int, task: int = 0, n_keys: int = 16, seed: int = 0, *, split: str = "train"):
        if not 0 <= task < MAX_TASKS:
            raise ValueError(f"data.keymap.task={task}: use 0..{MAX_TASKS - 1} (the tag is one digit)")
        if not 2 <= n_keys <= 26:
            raise ValueError(f"data.keymap.n_keys={n_keys}: use 2..26 (keys and values are the letters a..z)")
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r}: use 'train' or 'eval'")
        self.tok, self.seq_len, self.task, self.n_keys, self.seed = tokenizer, int(seq_len), task, n_keys, seed
        self.split_id = {"train": 0, "eval": 1}[split]
        enc = tokenizer.encode
        self._tag = enc(str(task))
        self._letters = [enc(chr(ord("a") + i)) for i in range(n_keys)]
        self._eq, self._sp = enc("="), enc(" ")
        if any(len(x) != 1 for x in [self._tag, self._eq, self._sp, *self._letters]):
            raise ValueError(f"data.source=keymap needs a tokenizer with one token per digit/letter ({tokenizer!r} "
                             "merges them): use data.tokenizer=byte")
        self._bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        self.n_pairs = (self.seq_len + 1 - len(self._bos) + 1) // PAIR_TOKENS  # the last pair needs no trailing space
        if self.n_pairs < 1:
            raise ValueError(f"data.seq_len={seq_len} is too short for data.source=keymap: use at least "
                             f"{PAIR_TOKENS - 2 + len(self._bos)} (one pair)")
        self.mapping = task_mapping(task, n_keys)

    def sample(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.split_id, self.task, int(index)])
        keys = rng.integers(0, self.n_keys, size=self.n_pairs)
        toks, value_pos = list(self._bos), []
        for k in keys:
            toks += self._tag + self._letters[k] + self._eq
            value_pos.append(len(toks))
            toks += self._letters[self.mapping[k]] + self._sp
        total = self.seq_len + 1
        toks = (toks + [self.tok.pad_id] * total)[:total]
        tokens = torch.tensor(toks, dtype=torch.long)
        S = self.seq_len
        labels = torch.full((S,), IGNORE_INDEX, dtype=torch.long)
        vp = torch.tensor(value_pos) - 1  # label j is tokens[j + 1]
        labels[vp] = tokens[vp + 1]
        answer_mask = torch.zeros(S, dtype=torch.bool)
        answer_mask[vp[-1]] = True
        return {"input_ids": tokens[:-1].clone(), "labels": labels, "position_ids": torch.arange(S),
                "doc_ids": torch.zeros(S, dtype=torch.long), "answer_mask": answer_mask}
