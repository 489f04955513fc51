"""A replay buffer of training samples, reservoir-sampled (Vitter's algorithm R) over every stage.

It stores (stage, sample index) pairs, not tokens: samples are rebuilt from their dataset on use, so
the buffer is a few bytes per entry and fits in a checkpoint's meta.json. Its size is given in
tokens; it holds `size_tokens // longest seq_len` sequences, so it never exceeds that budget.
Every rank feeds it the same global batches and draws with generators seeded by (seed, count), so
it is identical on every rank and after a resume, without any random state to store.
"""

from __future__ import annotations

import numpy as np


class ReplayBuffer:
    def __init__(self, size_tokens: int, seq_lens: list[int], seed: int):
        self.seq_lens = list(seq_lens)  # seq_len of each stage's samples
        self.capacity = size_tokens // max(seq_lens)
        if self.capacity < 1:
            raise ValueError(f"finetune.fpf.replay_tokens={size_tokens} holds no sequence of {max(seq_lens)} tokens")
        self.size_tokens, self.seed = size_tokens, seed
        self.items: list[tuple[int, int]] = []
        self.seen = 0

    def add(self, stage: int, index: int) -> None:
        n = self.seen
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append((stage, index))
            return
        j = int(np.random.default_rng([self.seed, n]).integers(n + 1))  # keep the new item with probability cap/(n+1)
        if j < self.capacity:
            self.items[j] = (stage, index)

    def tokens(self) -> int:
        return sum(self.seq_lens[s] for s, _ in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def state_dict(self) -> dict:
        return {"items": [list(x) for x in self.items], "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.items = [tuple(x) for x in state["items"]]
        self.seen = int(state["seen"])
