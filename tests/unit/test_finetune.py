"""Continual-learning pieces that need no process group: metrics, HFT's draw, replay, FPF's selection, config."""

import pytest
import torch

from longtrain.config import ConfigError, load_config
from longtrain.finetune import AccuracyMatrix, resolve_stages
from longtrain.finetune.fpf import module_drift, select_modules, snapshot
from longtrain.finetune.hft import ATTN, MLP, NORMS, draw_selection
from longtrain.finetune.replay import ReplayBuffer
from longtrain.models import PRESETS, build_model


def test_accuracy_matrix_op_bwt_hand_checked():
    m = AccuracyMatrix(["a", "b", "c"])
    m.add_row([0.9])
    assert m.op() == pytest.approx(0.9) and m.bwt() is None  # one stage: no backward transfer
    m.add_row([0.5, 0.8])
    m.add_row([0.3, 0.6, 0.7])
    # OP = (0.3 + 0.6 + 0.7) / 3; BWT = ((0.3 - 0.9) + (0.6 - 0.8)) / 2
    assert m.op() == pytest.approx(1.6 / 3)
    assert m.bwt() == pytest.approx(-0.4)
    rec = m.record()
    assert rec["stage"] == 2 and rec["acc_row"] == [0.3, 0.6, 0.7] and rec["bwt"] == pytest.approx(-0.4)
    table = m.table()
    assert "| b | 50.0 | 80.0 |  |" in table and "OP = 53.3%, BWT = -40.0%" in table


@pytest.mark.parametrize("layers", [2, 5])
def test_hft_selection_follows_the_category_rule(layers):
    sels = [draw_selection(layers, seed=3, stage=s) for s in range(4)]
    for sel in sels:
        mlp_counts = []
        for i in range(layers):
            mine = [n.split(f"model.layers.{i}.", 1)[1] for n in sel if n.startswith(f"model.layers.{i}.")]
            assert sum(n.startswith("self_attn.") and n.split(".")[1] in ATTN for n in mine) == 2
            assert sum(n in NORMS for n in mine) == 1
            mlp_counts.append(sum(n.startswith("mlp.") and n.split(".")[1] in MLP for n in mine))
            assert len(mine) == 2 + 1 + mlp_counts[-1]
        assert set(mlp_counts) <= {1, 2}
        assert all(a != b for a, b in zip(mlp_counts, mlp_counts[1:]))  # 2 and 1 alternate
    assert len({tuple(s) for s in sels}) == 4  # re-selected at every stage
    assert draw_selection(layers, seed=3, stage=1) == sels[1]  # reproducible from (seed, stage)


def test_replay_buffer_reservoir_respects_its_size():
    buf = ReplayBuffer(size_tokens=1000, seq_lens=[64, 128, 64], seed=0)
    assert buf.capacity == 1000 // 128
    for stage in range(3):
        for i in range(300):
            buf.add(stage, i)
            assert buf.tokens() <= 1000 and len(buf) <= buf.capacity
    assert len(buf) == buf.capacity and buf.seen == 900
    assert len({s for s, _ in buf.items}) >= 2  # samples of several stages survive
    # the state is enough to continue identically (resume)
    twin = ReplayBuffer(1000, [64, 128, 64], seed=0)
    twin.load_state_dict(buf.state_dict())
    for b in (buf, twin):
        for i in range(50):
            b.add(2, 1000 + i)
    assert twin.items == buf.items


def test_fpf_drift_and_selection():
    model = build_model(PRESETS["debug"], device=torch.device("cpu"), dtype=torch.float32, seed=0)
    ref = snapshot(model)
    assert "lm_head" not in ref  # tied to the embeddings: counted once
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.5)
        model.model.layers[0].input_layernorm.weight.add_(0.1)
    drift = module_drift(model, ref)
    assert drift["model.layers.1.mlp.down_proj"] == pytest.approx(0.5)
    assert drift["model.layers.0.input_layernorm"] == pytest.approx(0.1)
    assert drift["model.embed_tokens"] == 0.0
    assert select_modules(drift, "topk", 1, 0.0) == ["model.layers.1.mlp.down_proj"]
    assert select_modules(drift, "threshold", 9, 0.05) == ["model.layers.1.mlp.down_proj",
                                                           "model.layers.0.input_layernorm"]


def test_stages_resolve_over_the_data_section():
    cfg = load_config("continual-cpu", ["stages=[{name: x, steps: 7, data: {keymap: {task: 4}, seq_len: 32}}, {}]"])
    a, b = resolve_stages(cfg)
    assert (a.name, a.steps, a.data.keymap.task, a.data.seq_len) == ("x", 7, 4, 32)
    assert (b.name, b.steps, b.lr, b.data.keymap.task) == ("task1", cfg.train.steps, cfg.train.lr, 0)
    assert a.data.keymap.n_keys == cfg.data.keymap.n_keys  # untouched keys come from data:


@pytest.mark.parametrize("mode", ["full", "hft", "fpf", "kfpf"])
def test_every_mode_with_zero3_stages_is_accepted(mode):
    """ZeRO-3 with stages and every mode is accepted (tests/distributed/test_continual.py runs them)."""
    cfg = load_config("continual-cpu", [f"finetune.mode={mode}", "parallel.engine=deepspeed", "parallel.zero_stage=3"])
    assert len(cfg.stages) == 3 and cfg.parallel.zero_stage == 3


@pytest.mark.parametrize("override,needle", [
    (["finetune.mode=hfft"], "finetune.mode='hfft' is not one of ['full', 'hft', 'fpf', 'kfpf'] (did you mean 'hft'?)"),
    (["stages=[{data: {seqlen: 3}}]"], "unknown key 'stages[0].data.seqlen' (did you mean 'stages[0].data.seq_len'?)"),
    (["stages=[{stepz: 3}]"], "unknown key 'stages[0].stepz'"),
    (["stages=[{data: {keymap: {task: 12}}}]"], "stages[0].data.keymap.task=12"),
    (["stages=[{name: a}, {name: a}]"], "stages[1].name='a' is used twice"),
    (["finetune.mode=kfpf", "finetune.fpf.replay_tokens=10"], "finetune.fpf.replay_tokens=10 holds no sequence"),
    (["finetune.fpf.select=top"], "did you mean 'topk'?"),
])
def test_bad_continual_learning_config_names_the_fix(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("continual-cpu", override)
    assert needle in str(e.value)
