"""longtrain: train LLMs on million-token sequences on one GPU node or many."""

__version__ = "0.1.0"
