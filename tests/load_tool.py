"""A script under tools/ imported as a module, for the tests of the benchmarks and tools."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_tool(relpath: str, name: str):
    """tools/`relpath` as module `name`, registered in sys.modules first (dataclasses look their module up
    while a class is made, and spawned ranks import the same name)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
