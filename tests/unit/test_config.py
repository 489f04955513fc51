"""Recipes, overrides and the messages a user sees for bad input."""

import subprocess
import sys

import pytest

from longtrain.config import ConfigError, load_config, to_yaml
from longtrain.config.schema import Config


def test_defaults_and_overrides_are_typed():
    cfg = load_config("debug", ["train.steps=20", "train.lr=1e-4", "data.needle.n_keys=2", "model.vocab_size=null"])
    assert isinstance(cfg, Config)
    assert cfg.train.steps == 20 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.preset == "debug"  # from the recipe
    assert cfg.train.beta2 == 0.95 and cfg.data.needle.n_keys == 2
    assert "steps: 20" in to_yaml(cfg)


@pytest.mark.parametrize("override,needle", [
    (["train.stpes=3"], "unknown key 'train.stpes' (did you mean 'train.steps'?)"),
    (["trian.steps=3"], "unknown key 'trian' (did you mean 'train'?)"),
    (["train.steps=abc"], "train.steps"),
    (["train.steps=0"], "train.steps=0 must be > 0"),
    (["train.precision=bfloat16"], "train.precision='bfloat16' is not one of ['fp32', 'bf16'] (did you mean 'bf16'?)"),
    (["model.preset=llama3-7b"], "model.preset='llama3-7b' is not one of"),
    (["train.attention_kernel=cudnnn"], "did you mean 'cudnn'?"),
    (["data.source=jsonl"], "data.source='jsonl' needs data.paths"),
    (["data.paths=[/nope.jsonl]", "data.source=jsonl"], "'/nope.jsonl' does not exist"),
    (["checkpoint.resume=/nope"], "checkpoint.resume='/nope'"),
    (["train.steps"], "is not key=value"),
    (["train.precision=bf16", "model.dtype=float64"], "model.dtype=float32"),
    (["model.num_hidden_layers=0"], "model.num_hidden_layers=0 must be > 0"),
    (["memory.planner.reuse_after=released"], "memory.planner.reuse_after='released' is not one of ['free', "
                                               "'next_pass', 'release'] (did you mean 'release'?)"),
    (["memory.planner.enabled=true", "memory.planner.time_limit_s=400", "launch.timeout_s=600"],
     "memory.planner.time_limit_s=400 is more than half of launch.timeout_s=600"),
])
def test_bad_values_name_the_key_and_the_fix(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("debug", override)
    assert needle in str(e.value)


def test_depth_override_keeps_the_width(tmp_path):
    from longtrain.train.preflight import model_shape

    full = model_shape(load_config("quickstart"))
    cut = model_shape(load_config("quickstart", ["model.num_hidden_layers=2"]))
    assert (full.num_hidden_layers, cut.num_hidden_layers) == (4, 2)
    assert cut.hidden_size == full.hidden_size and cut.intermediate_size == full.intermediate_size
    (tmp_path / "config.json").write_text("{}")  # a checkpoint's weights fix its depth
    with pytest.raises(ConfigError, match="model.num_hidden_layers=2 with model.pretrained"):
        load_config("quickstart", [f"model.pretrained={tmp_path}", "model.num_hidden_layers=2"])


def test_unknown_recipe_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'quickstart'"):
        load_config("quickstrat")


def test_bad_key_in_recipe_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  steps: 3\n  warmup: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.warmup' \(did you mean 'train.warmup_steps'\?\)"):
        load_config(str(p))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "longtrain", *args], capture_output=True, text=True, timeout=120)


def test_cli_config_show_prints_resolved_config():
    r = _cli("config", "show", "quickstart", "train.steps=7")
    assert r.returncode == 0, r.stderr
    assert "steps: 7" in r.stdout and "preset: tiny" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (("train", "debug", "train.stpes=3"), "did you mean 'train.steps'?"),
    (("train", "debug", "model.vocab_size=100"), "set model.vocab_size=259 or more"),
    (("train", "debug", "data.seq_len=16"), "data.seq_len=16"),
    (("config", "show", "nope"), "recipe 'nope' not found"),
    (("train", "debug", "train.attention_kernel=cudnn", "train.device=cpu"), "available there: math, cpu_flash"),
])
def test_cli_user_errors_exit_2_without_traceback(args, needle):
    r = _cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_defaults_to_the_quickstart_recipe():
    r = _cli("config", "show", "train.steps=3")  # overrides alone: the embedded default recipe
    assert r.returncode == 0, r.stderr
    assert "preset: tiny" in r.stdout and "steps: 3" in r.stdout
