"""Data: tokenizers, document sources, packing, the synthetic needle task, the resumable sampler."""

from .dataset import PackedDataset, TaskDataset, build_dataset, collate
from .keymap import KeymapTask, task_mapping
from .needle import NeedleTask, needle_accuracy
from .packing import IGNORE_INDEX, PackedSequence, PackedStream, pack_documents
from .sampler import ResumableSampler
from .sources import iter_jsonl, iter_text, load_memmap, split_on_eos
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer",
    "iter_jsonl", "iter_text", "load_memmap", "split_on_eos",
    "IGNORE_INDEX", "PackedSequence", "PackedStream", "pack_documents",
    "NeedleTask", "needle_accuracy", "KeymapTask", "task_mapping",
    "ResumableSampler",
    "TaskDataset", "PackedDataset", "build_dataset", "collate",
]
