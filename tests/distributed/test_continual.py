"""Continual-learning modes through the real trainer and ZeRO-2, on 1 and on 2 gloo processes.

One worker per rank runs, in one process (to keep the suite fast):
  1. hft, 2 stages, checkpoints inside both: per stage, frozen parameters are bit-identical after the
     stage and never get a gradient; the optimizer holds exactly the trainable parameters; the
     selection is re-drawn per stage; accuracy matrix, OP and BWT are recorded;
  2. the same recipe resumed from the checkpoint in the middle of stage 2 with another hft seed:
     the stored selection is re-applied (not re-drawn) and the losses continue as in run 1;
  3. kfpf, 2 stages (sequence parallel over the 2 ranks when there are 2): each FPF fine-tune changes
     the selected modules only, leaves ZeRO's fp32 master copy equal to the weights, and the replay
     buffer stays within its token budget;
  4. fpf (data parallel): one such fine-tune after the last stage, with the same checks;
  5. hft again on the plain torch engine (DDP on 2 ranks), with the checks of 1.
Each rank reports what it saw; the test compares the ranks (selections, buffers must be identical).
"""

import json
import os

import pytest
import torch

from ranks import spawn_ranks

pytestmark = pytest.mark.slow


def _cfg(out, *extra):
    from longtrain.config import load_config

    return load_config("continual-cpu", [
        f"train.output_dir={out}", "parallel.engine=deepspeed", "parallel.zero_stage=2", "data.seq_len=32",
        "data.keymap.n_keys=6", "train.micro_batch_size=2", "train.eval_samples=4", "train.warmup_steps=1",
        "train.log_interval=100", "stages=[{name: a, steps: 3, data: {keymap: {task: 0}}}, "
        "{name: b, steps: 4, data: {keymap: {task: 1}}}]", "checkpoint.interval=2", "checkpoint.keep_last=10",
        *extra])


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}


def _run(cfg, mesh, checks, verify=True):
    """Train with `checks` wrapped around the mode's hooks (`verify=False` for a resumed run: its
    weights are loaded after the stage starts, so the stage-start snapshot is not its reference)."""
    from longtrain.train.trainer import Trainer

    tr = Trainer(cfg, mesh)
    start, end = tr.mode.on_stage_start, tr.mode.on_stage_end

    def on_stage_start(model, stage):
        rec = start(model, stage)
        checks["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        checks["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        checks.setdefault("selections", {})[stage] = rec.get("hft_modules")
        return rec

    def on_stage_end(ctx, stage, last):
        if not verify:
            return end(ctx, stage, last)
        model, eng = ctx.model, ctx.engine
        named = dict(model.named_parameters())
        trainable = {n for n, p in named.items() if p.requires_grad}
        assert trainable == checks["trainable"]
        by_id = {id(p): n for n, p in named.items()}
        held = {by_id[id(p)] for p in eng.optimized_parameters()}
        assert held == trainable, (held ^ trainable)  # optimizer state only for trainable parameters
        if eng.name == "torch":  # AdamW's per-parameter state (moments) too
            assert {by_id[id(p)] for p in eng.optimizer.state} == trainable
        for n, p in named.items():
            if n in trainable:
                assert not torch.equal(p, checks["before"][n]), n
            else:
                assert p.grad is None, n
                assert torch.equal(p, checks["before"][n]), n  # bit-identical
        checks.setdefault("fractions", []).append(len(trainable) / len(named))
        return end(ctx, stage, last)

    tr.mode.on_stage_start, tr.mode.on_stage_end = on_stage_start, on_stage_end
    return tr, tr.run()


def _check_master_equals_weights(engine):
    opt = engine.ds.optimizer
    for g, fp32 in enumerate(opt.single_partition_of_fp32_groups):
        part = opt.parallel_partitioned_bit16_groups[g][torch.distributed.get_rank()]
        assert torch.equal(fp32, part.float())


def _worker(rank, world, port, tmp, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import logging

    import longtrain.finetune.fpf as fpf
    from longtrain.parallel import init_mesh
    from pathlib import Path

    logging.disable(logging.WARNING)
    mesh = init_mesh("cpu", "gloo", timeout_s=120, need_group=True, sp_degree=world)
    try:
        tmp = Path(tmp)
        report = {"rank": rank}
        # 1. hft with dp over the ranks
        mesh_dp = mesh
        if world > 1:
            mesh_dp = init_mesh("cpu", "gloo", timeout_s=120, need_group=True, sp_degree=1)
        checks: dict = {}
        _, summary = _run(_cfg(tmp / "hft", "finetune.mode=hft"), mesh_dp, checks)
        report["hft_selections"] = checks["selections"]
        report["hft_fractions"] = checks["fractions"]
        report["hft_summary"] = {k: summary[k] for k in ("op", "bwt")}
        # 2. resume in the middle of stage 2 (step 4) with another seed: the stored selection comes back
        resumed: dict = {}
        _run(_cfg(tmp / "hft", "finetune.mode=hft", "finetune.hft.seed=99",
                  f"checkpoint.resume={tmp / 'hft' / 'checkpoints' / 'step_00000004'}"), mesh_dp, resumed, verify=False)
        report["resumed_selection"] = resumed["selections"][1]
        # 3. kfpf, sequence parallel over all ranks
        rounds = []
        real = fpf.replay_finetune

        def spy(ctx, modules, buffer, fcfg, round_id):
            named = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
            rec = real(ctx, modules, buffer, fcfg, round_id)
            changed = {n for n, p in ctx.model.named_parameters() if not torch.equal(p, named[n])}
            _check_master_equals_weights(ctx.engine)
            rounds.append({"modules": modules, "changed": sorted(changed), "items": [list(x) for x in buffer.items],
                           "tokens": buffer.tokens()})
            return rec

        fpf.replay_finetune = spy
        _run(_cfg(tmp / "kfpf", "finetune.mode=kfpf", "finetune.fpf.k=2", "finetune.fpf.steps=2",
                  "finetune.fpf.top_k=3", "finetune.fpf.replay_tokens=200", "finetune.fpf.micro_batch_size=2",
                  f"parallel.sp.degree={world}"), mesh, {})
        report["kfpf_rounds"] = list(rounds)
        # 4. fpf: one fine-tune after the last stage, from the drift summed over both stages
        rounds.clear()
        _run(_cfg(tmp / "fpf", "finetune.mode=fpf", "finetune.fpf.steps=2", "finetune.fpf.top_k=2",
                  "finetune.fpf.replay_tokens=200", "checkpoint.interval=0"), mesh_dp, {})
        report["fpf_rounds"] = list(rounds)
        # 5. hft on the plain torch engine (DDP on 2 ranks): the same per-stage checks
        torch_checks: dict = {}
        _run(_cfg(tmp / "hft_torch", "finetune.mode=hft", "parallel.engine=torch", "checkpoint.interval=0"),
             mesh_dp, torch_checks)
        report["torch_selections"] = torch_checks["selections"]
        q.put(report)
    except BaseException as e:  # report instead of hanging the other rank's test
        import traceback

        traceback.print_exc()
        q.put({"rank": rank, "error": traceback.format_exc()})
        raise SystemExit(1) from e
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2], ids=["1proc", "2proc"])
def test_continual_modes_zero2(tmp_path, world):
    reports = sorted(spawn_ranks(_worker, world, str(tmp_path), timeout=300), key=lambda r: r["rank"])
    for r in reports:
        assert "error" not in r, r.get("error")
    r0 = reports[0]
    sel = r0["hft_selections"]
    assert sel[0] != sel[1]  # re-selected per stage
    assert all(0.3 < f < 0.8 for f in r0["hft_fractions"])  # about half (embeddings are large in the debug model)
    assert r0["resumed_selection"] == sel[1]  # the checkpoint's selection, not seed 99's
    # every rank trained the same halves and kept the same replay buffer (all-gathered check ran too)
    for r in reports[1:]:
        assert r["hft_selections"] == sel and r["kfpf_rounds"] == r0["kfpf_rounds"]
    # resumed losses continue those of the uninterrupted run (same run dir: steps 5..7 appended again)
    recs = [json.loads(x) for x in (tmp_path / "hft" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    first = dict(losses[:7])
    again = dict(losses[7:])
    assert sorted(again) == [5, 6, 7]
    for s in again:
        assert again[s] == pytest.approx(first[s], rel=1e-6), s
    cl = [r for r in recs if "op" in r]
    assert [c["stage"] for c in cl] == [0, 1, 1]  # both stages of run 1, the last one of the resumed run
    assert cl[1]["op"] == pytest.approx(sum(cl[1]["acc_row"]) / 2)
    assert cl[1]["bwt"] == pytest.approx(cl[1]["acc_row"][0] - cl[0]["acc_row"][0])
    assert "OP =" in (tmp_path / "hft" / "accuracy_matrix.md").read_text()
    # kfpf: two rounds, each touching only the selected modules, the buffer within 200 tokens
    rounds = r0["kfpf_rounds"]
    assert len(rounds) == 2
    for rd in rounds:
        prefixes = tuple(m + "." for m in rd["modules"])
        assert rd["changed"] and all(n.startswith(prefixes) for n in rd["changed"]), rd
        assert rd["tokens"] <= 200 and len(rd["items"]) == 200 // 32
    assert {s for s, _ in rounds[1]["items"]} == {0, 1}  # replay spans the stages
    (fp,) = r0["fpf_rounds"]  # fpf: once, at the end
    assert len(fp["modules"]) == 2 and fp["changed"]
    assert all(n.startswith(tuple(m + "." for m in fp["modules"])) for n in fp["changed"]), fp
    assert fp["tokens"] <= 200 and {s for s, _ in fp["items"]} == {0, 1}
    for r in reports[1:]:
        assert r["fpf_rounds"] == r0["fpf_rounds"]
    assert r0["torch_selections"] == sel  # same seed, same draw, whatever the engine
