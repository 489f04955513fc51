"""Docs that are generated must stay in step with the code they describe."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_current():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "config_doc.py")], capture_output=True, text=True,
                         check=True).stdout
    assert out == (ROOT / "docs" / "config.md").read_text(), "run: python tools/config_doc.py > docs/config.md"


def test_every_recipe_loads():
    from longtrain.config import load_config

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 3
    for r in recipes:
        load_config(str(r))
