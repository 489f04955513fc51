"""A resumable, data-parallel batch sampler whose global batches do not depend on dp_size.

The global sample stream is epoch 0's permutation, then epoch 1's, ... (torch.randperm seeded
with seed + epoch). Global batch t is stream[t*G : (t+1)*G] (G = global_batch_size; a batch
may straddle two epochs) and rank r takes its contiguous slice of G/dp_size. So a run on
2 ranks sees exactly the samples of a 1-rank run, and a run may resume on another dp_size.
The state is one number: global samples consumed.
"""

from __future__ import annotations

from typing import Iterator

import torch


class ResumableSampler:
    def __init__(self, num_samples: int, global_batch_size: int, dp_rank: int, dp_size: int, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: the dataset is empty; add data or lower seq_len")
        if global_batch_size < 1 or dp_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size} and dp_size={dp_size} must be >= 1")
        if global_batch_size % dp_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by dp_size={dp_size}; "
                f"use a multiple of {dp_size} (e.g. {(global_batch_size // dp_size + 1) * dp_size})"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        self.num_samples, self.global_batch_size = int(num_samples), int(global_batch_size)
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, int(seed), shuffle
        self.local_batch_size = global_batch_size // dp_size
        self.consumed = 0  # global samples handed out (all ranks together)
        self._perm_epoch, self._perm = -1, None

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_samples

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:  # cache one epoch's order: batches walk through it in turn
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(self.num_samples, generator=g)
            else:
                self._perm = torch.arange(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, start: int, stop: int) -> list[int]:
        """Positions [start, stop) of the global sample stream."""
        out = []
        while start < stop:
            epoch, off = divmod(start, self.num_samples)
            n = min(stop - start, self.num_samples - off)
            out += self._order(epoch)[off : off + n].tolist()
            start += n
        return out

    def batch_indices(self, step: int) -> list[int]:
        """This rank's indices for global step `step` counted from sample 0 (pure: does not move the state)."""
        a = step * self.global_batch_size + self.dp_rank * self.local_batch_size
        return self.global_indices(a, a + self.local_batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        """Endless: one list of this rank's indices per step, from the current state on.

        The state advances as each batch is yielded; a loader that prefetches batches runs ahead
        of training, so checkpoint `consumed = steps_done * global_batch_size` in that case.
        """
        while True:
            a = self.consumed + self.dp_rank * self.local_batch_size
            self.consumed += self.global_batch_size
            yield self.global_indices(a, a + self.local_batch_size)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "num_samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_samples", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this run has {key}={getattr(self, key)}: "
                    f"the sample order would differ; resume with the same data and seed"
                )
        # Any count works (even after a global batch size change): batches start where it left off.
        self.consumed = int(state["consumed"])
