"""Synthetic long-context retrieval: passkey (n_keys=1) and multi-key needle-in-a-haystack.

A sample is, token for token (S = seq_len, S + 1 tokens in all):
    [bos] filler... " The secret value for key <name> is 12345." ...filler (n_keys needles at
    random depths) " What is the secret value for key <name>? The secret value for key <name> is "
    <answer digits> "."
The filler draws words from a small fixed list so that even a tiny model learns its
distribution quickly and the loss that remains is the retrieval itself. Pieces are tokenized
separately and concatenated, so the answer's token positions are exact for any tokenizer.

A sample depends only on (seed, split, index): random access, any call order, any process.
"""

from __future__ import annotations

import numpy as np
import torch

from .packing import IGNORE_INDEX

WORDS = (
    "the grass is green sky blue sun yellow here we go there and back again a day night "
    "river stone tree bird song light wind cold warm road home old new small big red"
).split()
KEY_NAMES = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()
_SPLITS = {"train": 0, "eval": 1}  # separate seed streams: eval samples are not training samples


def _needle(name: str, value: str) -> str:
    return f" The secret value for key {name} is {value}."


def _question(name: str) -> str:
    return f" What is the secret value for key {name}? The secret value for key {name} is "


class NeedleTask:
    def __init__(self, tokenizer, seq_len: int, n_keys: int = 1, value_digits: int = 5, loss_on: str = "all", seed: int = 0, *, split: str = "train"):
        if loss_on not in ("all", "answer"):
            raise ValueError(f"needle.loss_on={loss_on!r}: use 'all' (every token) or 'answer' (answer tokens only)")
        if not 1 <= n_keys <= len(KEY_NAMES):
            raise ValueError(f"needle.n_keys={n_keys}: must be between 1 and {len(KEY_NAMES)}")
        if not 1 <= value_digits <= 18 or 10**value_digits < n_keys:  # 18: values are drawn as int64
            raise ValueError(f"needle.value_digits={value_digits}: use 1..18 digits, enough for {n_keys} distinct values")
        if split not in _SPLITS:
            raise ValueError(f"split={split!r}: use 'train' or 'eval'")
        if seed < 0:
            raise ValueError(f"data.seed={seed} must be >= 0")
        self.tok, self.seq_len, self.n_keys, self.value_digits = tokenizer, int(seq_len), n_keys, value_digits
        self.loss_on, self.seed, self.split = loss_on, seed, split
        enc = lambda s: np.asarray(tokenizer.encode(s), dtype=np.int64)  # noqa: E731
        self._enc = enc
        self._bos = np.asarray([] if tokenizer.bos_id is None else [tokenizer.bos_id], dtype=np.int64)
        self._dot = enc(".")
        self._words = [w for w in (enc(" " + w) for w in WORDS) if w.size]
        self._max_word = max(w.size for w in self._words)
        # A one-token piece closes the last gap exactly; without one the last word is truncated.
        self._one = next((t for t in (enc(s) for s in (" ", ".", ",", "\n")) if t.size == 1), None)
        # Fixed part at its longest (probing values of every digit) so every sample fits.
        probes = [d * value_digits for d in "0123456789"] + [("0123456789" * 3)[i : i + value_digits] for i in range(10)]
        longest_needle = max(enc(_needle(n, v)).size for n in KEY_NAMES for v in probes)
        longest_qa = max(enc(_question(n)).size for n in KEY_NAMES) + max(enc(v).size for v in probes)
        self.min_seq_len = self._bos.size + n_keys * longest_needle + longest_qa + self._dot.size - 1
        if self.seq_len < self.min_seq_len:
            raise ValueError(
                f"data.seq_len={seq_len} is too short for the needle task (n_keys={n_keys}, value_digits={value_digits}): "
                f"it needs at least {self.min_seq_len} tokens; raise seq_len or lower n_keys/value_digits"
            )

    def _filler(self, rng: np.random.Generator, budget: int) -> list[np.ndarray]:
        words, lens = self._words, np.array([w.size for w in self._words])
        out = []
        # Bulk draw while far from the end (fast for million-token sequences) ...
        while budget >= self._max_word:
            idx = rng.integers(0, len(words), size=max(1, budget // self._max_word))
            out += [words[i] for i in idx]
            budget -= int(lens[idx].sum())
        # ... then only words that still fit, so the filler lands on the budget exactly.
        while budget > 0:
            fits = np.flatnonzero(lens <= budget)
            if fits.size:
                w = words[int(rng.choice(fits))]
            elif self._one is not None:
                w = self._one
            else:
                w = words[int(rng.integers(len(words)))][:budget]
            out.append(w)
            budget -= w.size
        assert budget == 0
        return out

    def sample(self, index: int) -> dict:
        if index < 0:
            raise IndexError(f"needle sample index {index} must be >= 0")
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], int(index)])
        names = [KEY_NAMES[i] for i in rng.choice(len(KEY_NAMES), size=self.n_keys, replace=False)]
        values = [f"{v:0{self.value_digits}d}" for v in rng.choice(10**self.value_digits, size=self.n_keys, replace=False)]
        asked = int(rng.integers(self.n_keys))
        needles = [self._enc(_needle(n, v)) for n, v in zip(names, values)]
        question, answer = self._enc(_question(names[asked])), self._enc(values[asked])
        fixed = self._bos.size + sum(n.size for n in needles) + question.size + answer.size + self._dot.size
        total = self.seq_len + 1
        if fixed > total:  # only if a tokenizer merges beyond the probed worst case
            raise ValueError(f"data.seq_len={self.seq_len} is too short for needle sample {index}: it needs {fixed - 1} tokens; raise seq_len")
        filler = self._filler(rng, total - fixed)
        depths = np.sort(rng.integers(0, len(filler) + 1, size=self.n_keys))
        pieces = [self._bos]
        prev = 0
        for d, needle in zip(depths, needles):
            pieces += filler[prev:d] + [needle]
            prev = d
        pieces += filler[prev:] + [question, answer, self._dot]
        tokens = np.concatenate(pieces)
        assert tokens.size == total, (tokens.size, total)

        S = self.seq_len
        a0 = total - self._dot.size - answer.size  # first answer token in `tokens`
        answer_mask = np.zeros(S, dtype=bool)
        answer_mask[a0 - 1 : a0 - 1 + answer.size] = True  # label j is tokens[j + 1]
        labels = tokens[1:].copy()
        if self.loss_on == "answer":
            labels[~answer_mask] = IGNORE_INDEX
        return {
            "input_ids": torch.from_numpy(tokens[:-1].copy()),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.arange(S, dtype=torch.long),
            "doc_ids": torch.zeros(S, dtype=torch.long),
            "answer_mask": torch.from_numpy(answer_mask),
            "answer": values[asked],
        }


def needle_accuracy(logits_or_pred_ids: torch.Tensor, batch: dict) -> tuple[int, int]:
    """(n_correct, n_total) over samples that have answer positions.

    Correct = the argmax at every answer position equals the label (teacher-forced exact
    match; every earlier answer token is then right too, so it equals greedy decoding's).
    Accepts logits (..., S, V) or predicted ids (..., S), batched or not.
    """
    labels, mask = batch["labels"], batch["answer_mask"]
    pred = logits_or_pred_ids
    if pred.is_floating_point():
        if pred.dim() != labels.dim() + 1:
            raise ValueError(f"logits of shape {tuple(pred.shape)} do not match labels {tuple(labels.shape)} plus a vocabulary dim")
        pred = pred.argmax(-1)
    if pred.shape != labels.shape:
        raise ValueError(f"predictions of shape {tuple(pred.shape)} do not match labels {tuple(labels.shape)}")
    if labels.dim() == 1:
        labels, mask, pred = labels[None], mask[None], pred[None]
    mask = mask.to(torch.bool)
    # With loss_on="answer" or "all" the labels at answer positions are the answer tokens.
    ok = ((pred.to(labels.device) == labels) | ~mask).all(-1)
    has = mask.any(-1)
    return int((ok & has).sum()), int(has.sum())
