"""Document sources: JSON lines, plain text files, and flat pre-tokenized token files (memmap).

Text sources yield one `str` per document; `load_memmap` returns token arrays that
`split_on_eos` turns into documents. Every user error names the file (and line) at fault.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Sequence, Union

import numpy as np

PathsLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

MEMMAP_DTYPES = ("uint16", "uint32", "int32", "int64")


def _as_paths(paths: PathsLike, what: str) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError(f"data.paths is empty: the {what} source needs at least one file")
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"data file {p!r} does not exist: fix data.paths")
    return paths


def iter_jsonl(paths: PathsLike, text_field: str = "text") -> Iterator[str]:
    """One document per non-blank line: the string in `text_field` of a JSON object."""
    for path in _as_paths(paths, "jsonl"):
        # errors="replace": one stray byte should not abort a long run.
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object with a {text_field!r} field") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    raise ValueError(f"{path}:{lineno}: no field {text_field!r} in this line; set data.text_field to the field holding the text")
                text = obj[text_field]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, not a string")
                yield text


def iter_text(paths: PathsLike) -> Iterator[str]:
    """Each file is one document."""
    for path in _as_paths(paths, "text"):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def load_memmap(paths: PathsLike, dtype: str = "uint16") -> list[np.ndarray]:
    """One read-only 1-D memmap per file (flat token ids, documents separated by eos).

    A list rather than one concatenation so that nothing is copied and file ends stay
    document boundaries.
    """
    if str(dtype) not in MEMMAP_DTYPES:
        raise ValueError(f"data.memmap_dtype={dtype!r} is not supported; use one of {', '.join(MEMMAP_DTYPES)}")
    dt = np.dtype(dtype)
    out = []
    for path in _as_paths(paths, "memmap"):
        size = os.path.getsize(path)
        if size % dt.itemsize:
            raise ValueError(f"{path}: {size} bytes is not a multiple of {dt.itemsize} ({dtype}); check data.memmap_dtype")
        # np.memmap refuses empty files; an empty file simply holds no documents.
        out.append(np.memmap(path, dtype=dt, mode="r") if size else np.zeros(0, dtype=dt))
    return out


def split_on_eos(tokens: np.ndarray, eos_id: int) -> Iterator[np.ndarray]:
    """Documents of a flat token array (views, eos removed, empty documents skipped)."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id)
    start = 0
    for end in list(ends) + [len(tokens)]:
        if end > start:
            yield tokens[start:end]
        start = end + 1
