"""Shared test set-up: `tests/` is importable, so test files can use `ranks.spawn_ranks`."""
