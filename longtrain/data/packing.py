"""Greedy packing of documents into fixed-length training sequences.

The token stream is doc0 eos doc1 eos ... . Sequence k is the window stream[k*S : k*S + S + 1]
(S = seq_len): inputs are its first S tokens, labels its last S. Consecutive windows overlap
by one token (Megatron-style), so every token of the stream is an input exactly once and
no next-token prediction is lost at sequence boundaries.

Per sequence:
- labels: -100 where the next token belongs to another document (the eos ending a document
  is still the label of that document's last token: the model learns to stop) and on padding;
- doc_ids: 0, 1, 2, ... per document inside the sequence (non-decreasing), for per-document
  causal masks; padding forms one last document of its own;
- position_ids: restart at 0 at every document start AND at the start of every sequence: a
  document continued from the previous sequence cannot attend to its earlier part anyway, and
  restarting keeps positions below seq_len (the RoPE range the model trains on).
The trailing partial sequence is padded with pad_id (labels -100).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class PackedSequence:
    input_ids: torch.Tensor  # (S,) long
    labels: torch.Tensor  # (S,) long, -100 = no loss
    position_ids: torch.Tensor  # (S,) long, restart at 0 per document
    doc_ids: torch.Tensor  # (S,) long, non-decreasing from 0

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids, "doc_ids": self.doc_ids}


class PackedStream:
    """The concatenated stream of documents, cut lazily into packed sequences.

    Holds one int32 copy of the tokens (vocabularies are far below 2**31) plus one offset per
    document, so a dataset builds sequence k on demand instead of holding four int64 tensors
    per sequence.
    """

    def __init__(self, docs: Iterable[Sequence[int]], seq_len: int, eos_id: int, pad_id: int):
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len} must be at least 1")
        self.seq_len, self.eos_id, self.pad_id = int(seq_len), int(eos_id), int(pad_id)
        pieces, starts, n = [], [], 0
        eos = np.array([eos_id], dtype=np.int32)
        for doc in docs:
            doc = np.asarray(doc).astype(np.int32, copy=False)
            if doc.size == 0:  # an empty document would only add a lone eos
                continue
            starts.append(n)
            pieces += [doc, eos]
            n += doc.size + 1
        self.tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        self.doc_starts = np.asarray(starts, dtype=np.int64)
        # The last token (the final eos) is only ever a label, never a useful input.
        self.num_sequences = -(-(len(self.tokens) - 1) // self.seq_len) if len(self.tokens) else 0

    def __len__(self) -> int:
        return self.num_sequences

    def sequence(self, k: int) -> PackedSequence:
        if not 0 <= k < self.num_sequences:
            raise IndexError(f"packed sequence {k} out of range [0, {self.num_sequences})")
        S, N = self.seq_len, len(self.tokens)
        a = k * S
        idx = np.arange(a, a + S + 1)
        real = idx < N
        tok = np.full(S + 1, self.pad_id, dtype=np.int64)
        tok[real] = self.tokens[a : min(a + S + 1, N)]
        # Global document index of each window token; padding gets -1, a document of its own.
        doc = np.where(real, np.searchsorted(self.doc_starts, idx, side="right") - 1, -1)
        same_doc = (doc[:-1] == doc[1:]) & real[1:]
        labels = np.where(same_doc, tok[1:], IGNORE_INDEX)
        d = doc[:-1]
        new_doc = np.ones(S, dtype=bool)
        new_doc[1:] = d[1:] != d[:-1]
        doc_ids = np.cumsum(new_doc) - 1
        first = np.maximum.accumulate(np.where(new_doc, np.arange(S), 0))
        pos = np.arange(S) - first
        t = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))  # noqa: E731
        return PackedSequence(t(tok[:-1]), t(labels), t(pos), t(doc_ids))


def pack_documents(docs_token_lists: Iterable[Sequence[int]], seq_len: int, eos_id: int, pad_id: int) -> list[PackedSequence]:
    """Pack documents (token lists or arrays, without eos) into sequences of seq_len tokens."""
    stream = PackedStream(docs_token_lists, seq_len, eos_id, pad_id)
    return [stream.sequence(k) for k in range(len(stream))]
