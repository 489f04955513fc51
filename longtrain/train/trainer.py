"""The training loop. It knows the model, the optimizer and the data; every parallel or memory
technique reaches it only through `parallelize_model`, and every fine-tuning mode only through its
hooks (`longtrain/finetune/base.py`), so nothing here branches on them. A run is a list of stages
(continual learning; one stage when the recipe lists none), each with a freshly built engine.

Loss normalisation: each rank sums its per-token losses; every micro-batch's gradient is scaled by
world_size / (labelled tokens in the whole global batch), and the engine averages gradients over all
ranks. The update is therefore that of one process seeing the whole global batch, whatever the
number of ranks.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from longtrain.attention import get_kernel
from longtrain.config import Config, ConfigError, to_yaml
from longtrain.data import ResumableSampler, build_dataset, collate, load_tokenizer
from longtrain.finetune import AccuracyMatrix, build_mode, resolve_stages, stage_config, trainable_fraction
from longtrain.models import DTYPES, build_model, save_hf
from longtrain.parallel import Mesh, all_reduce_sum, init_mesh, parallelize_model
from longtrain.parallel.sharding import shard_sequence
from longtrain.train.checkpoint import find_resume, load_checkpoint, save_checkpoint
from longtrain.train.engine import build_engine
from longtrain.train.logger import RunLogger, log, setup_logging
from longtrain.train.metrics import memory_record, train_flops
from longtrain.train.preflight import model_shape
from longtrain.train.watchdog import StepWatchdog

BATCH_KEYS = ("input_ids", "labels", "position_ids", "doc_ids")


class _StopFlag:
    """SIGTERM/SIGINT (preemption) ask the loop to checkpoint and exit at the next step boundary."""

    def __init__(self):
        self.signum = 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Trainer:
    """Runs the recipe's stages in order (one stage when the recipe lists none). Per stage: the
    fine-tuning mode sets the trainable parameters, the engine is rebuilt for them, the stage's steps
    run, then every task seen so far is evaluated into the accuracy matrix (finetune/stages.py).
    The trainer also serves as the modes' `StageContext` (model, mesh, engine, sample, forward_loss)."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        t, m = cfg.train, cfg.model
        self.run_dir = Path(t.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.args = model_shape(cfg)
        assert self.args.vocab_size >= self.tokenizer.vocab_size, "preflight checks the vocabulary"
        self.model = build_model(self.args, device=mesh.device, dtype=DTYPES[m.dtype],
                                 attention_kernel=t.attention_kernel, pretrained=m.pretrained,
                                 init_std=m.init_std, seed=t.seed)
        parallelize_model(self.model, cfg, mesh)
        self.plan_runtime = getattr(self.model, "plan_runtime", None)  # memory.planner.enabled on CUDA
        if self.plan_runtime is not None:  # one planned iteration = one optimizer step (all its micro-steps)
            self.plan_runtime.iterations = "step"
        self.mode = build_mode(cfg, mesh)
        self.stages = resolve_stages(cfg)
        self.stage_ends = list(itertools.accumulate(s.steps for s in self.stages))
        self.total_steps = self.stage_ends[-1]
        self.train_sets = [self._dataset(s.data, "train") for s in self.stages]
        self.eval_sets = [self._dataset(s.data, "eval") for s in self.stages]
        self.acc = AccuracyMatrix([s.name for s in self.stages])
        self.per_rank = t.micro_batch_size * t.grad_accum
        self.engine = None
        self.stage = 0
        self.step = 0
        self.wandb_id = None

    def _dataset(self, d, split: str):
        return build_dataset(d.source, split=split, tokenizer=self.tokenizer, seq_len=d.seq_len, paths=list(d.paths),
                             text_field=d.text_field, memmap_dtype=d.memmap_dtype, eval_fraction=d.eval_fraction,
                             num_samples=d.num_samples, seed=d.seed,
                             needle_kwargs=dict(n_keys=d.needle.n_keys, value_digits=d.needle.value_digits,
                                                loss_on=d.needle.loss_on),
                             keymap_kwargs=dict(task=d.keymap.task, n_keys=d.keymap.n_keys))

    # ---- stages -------------------------------------------------------------------------------
    def begin_stage(self, i: int) -> dict:
        """The mode picks the trainable parameters, then a new engine (and optimizer) is built for
        exactly those: frozen parameters get no gradient and no optimizer state."""
        st, mesh = self.stages[i], self.mesh
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
            gc.collect()  # the old engine's flat buffers and hooks go before the new ones are made
        rec = self.mode.on_stage_start(self.model, i)
        self.stage = i
        self.engine = build_engine(self.model, stage_config(self.cfg, st), mesh)
        self.autocast = self.engine.autocast
        self.train_set, self.eval_set = self.train_sets[i], self.eval_sets[i]
        self.sampler = ResumableSampler(len(self.train_set), self.per_rank * mesh.dp_size, mesh.dp_rank,
                                        mesh.dp_size, seed=st.data.seed)
        self._batches = iter(self.sampler)  # lazy: reads the sampler's position at the first step (after resume)
        self.step_times: list[float] = []
        frac = trainable_fraction(self.model)
        log.info("stage %d/%d %r: %d steps at lr %.2e, finetune.mode=%s, %.1f%% of the parameters train",
                 i + 1, len(self.stages), st.name, st.steps, st.lr, self.cfg.finetune.mode, 100 * frac)
        return {"step": self.step, "stage": i, "stage_name": st.name, "trainable_fraction": frac, **rec}

    def end_stage(self, i: int, logger: RunLogger) -> dict:
        """The mode's stage-end work (FPF's fine-tune), then every task seen so far is evaluated."""
        rec = self.mode.on_stage_end(self, i, last=i == len(self.stages) - 1)
        if rec:
            logger.log_step({"step": self.step, "stage": i, **rec})
        evals = []
        for j in range(i + 1):
            ev = self.evaluate(self.eval_sets[j])
            logger.log_eval({**ev, "task": j} if len(self.stages) > 1 else ev)
            evals.append(ev)
        accs = [ev.get("eval_needle_acc") for ev in evals]
        if all(a is not None for a in accs):  # data with answers (needle, keymap): the accuracy matrix
            self.acc.add_row(accs)
            if self.mesh.is_main:
                (self.run_dir / "accuracy_matrix.md").write_text(self.acc.table())
            times = sorted(self.step_times[1:] or self.step_times)  # the first step also builds caches
            timing = {"stage_step_time_s_median": times[len(times) // 2]} if times else {}
            logger.log_stage({"step": self.step, **self.acc.record(), **timing,
                              "trainable_fraction": trainable_fraction(self.model)}, self.acc)
        return evals[-1]

    # ---- StageContext: what the modes may use -------------------------------------------------
    def sample(self, stage: int, index: int) -> dict:
        return self.train_sets[stage][index]

    def forward_loss(self, samples: list[dict]):
        b = self._to_device(collate(samples), BATCH_KEYS)
        with self.autocast:
            return self.model(b["input_ids"], b["position_ids"], b["labels"],
                              loss_tile_tokens=self.cfg.train.loss_tile_tokens, doc_ids_BS=self._docs(b))

    # ---- one optimizer step -------------------------------------------------------------------
    def _to_device(self, batch: dict, keys) -> dict:
        """This rank's part of a (B, S) batch on the device: the sp layout's tokens of each sequence
        (their global position ids included, so RoPE needs nothing else)."""
        mesh, lay = self.mesh, self.cfg.parallel.sp.layout
        out = {}
        for k in keys:
            v = batch[k]
            if k == "doc_ids" and not self._masks_documents(v):
                continue
            if mesh.sp_size > 1:
                v = shard_sequence(v, 1, layout=lay, rank=mesh.sp_rank, world=mesh.sp_size)
            out[k] = v.to(mesh.device, non_blocking=True)
        return out

    def _masks_documents(self, doc_ids_BS) -> bool:
        """Document masks matter only with data.document_mask on and some sequence holding several
        documents. Decided on the host's whole sequences (the same answer on every sp rank), so
        single-document data costs attention nothing: no all-gather, no device-to-host sync."""
        return self.stages[self.stage].data.document_mask and bool((doc_ids_BS != doc_ids_BS[:, :1]).any())

    @staticmethod
    def _docs(batch: dict):
        """The packed documents' ids when they are masked from each other (see _masks_documents)."""
        return batch.get("doc_ids")

    def _micro_batches(self):
        start = self.sampler.consumed
        idx = next(self._batches)
        # The mode sees the whole global batch (the same list on every rank), e.g. for a replay buffer.
        self.mode.on_batch(self.stage, self.sampler.global_indices(start, start + self.sampler.global_batch_size))
        samples = [self.train_set[i] for i in idx]
        mb = self.cfg.train.micro_batch_size
        return [self._to_device(collate(samples[i:i + mb]), BATCH_KEYS) for i in range(0, len(samples), mb)]
    def train_step(self) -> dict:
        """One optimizer step (all its micro-steps); with the planner on, one planned iteration: what runs
        between steps (evaluation, checkpoints) is none of it."""
        t0 = time.perf_counter()  # the step's time includes making the plan, in the step that makes it
        if self.plan_runtime is None:
            return self._step(t0)
        self.plan_runtime.begin_iteration()
        try:
            return self._step(t0)  # whose locals (the batch, the loss) are gone when it returns
        finally:
            self.plan_runtime.end_iteration()

    def _step(self, t0: float) -> dict:
        t, mesh = self.cfg.train, self.mesh
        batches = self._micro_batches()
        n_tok = sum((b["labels"] != -100).sum() for b in batches).to(torch.float64)
        global_tokens = all_reduce_sum(n_tok.clone(), mesh).item()
        scale = mesh.world_size / max(global_tokens, 1.0)  # engines average gradients over every rank
        lr = self.engine.lr  # the rate this step's update uses
        loss_sum = torch.zeros((), dtype=torch.float64, device=mesh.device)
        for i, b in enumerate(batches):
            with self.engine.micro_context(last=i == len(batches) - 1):
                with self.autocast:
                    loss, _ = self.engine.module(b["input_ids"], b["position_ids"], b["labels"],
                                                 loss_tile_tokens=t.loss_tile_tokens, doc_ids_BS=self._docs(b))
                self.engine.backward(loss * scale)
            loss_sum += loss.detach().double()
        grad_norm = self.engine.step()
        loss_val = all_reduce_sum(loss_sum, mesh).item() / max(global_tokens, 1.0)
        if mesh.device.type == "cuda":
            torch.cuda.synchronize(mesh.device)
        dt = time.perf_counter() - t0
        self.step += 1
        n_seqs = self.per_rank * mesh.dp_size
        seq_len = self.stages[self.stage].data.seq_len
        flops_dev = train_flops(self.args, n_seqs, seq_len) / mesh.world_size / dt
        return {"step": self.step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": n_seqs * seq_len / dt, "tflops_per_device": flops_dev / 1e12,
                "mfu": flops_dev / (t.peak_tflops * 1e12), **memory_record(mesh.device, self.model.swap_streams),
                "step_time_s": dt, "tokens": int(global_tokens)}

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_set=None) -> dict:
        """Mean loss over the eval set's first `eval_samples` sequences, and answer accuracy when the
        data has answers (needle, keymap: teacher-forced exact match on the answer tokens, the LM head
        applied only there; reported as eval_needle_acc). Default: the current stage's eval set."""
        model, mesh, t = self.model, self.mesh, self.cfg.train
        eval_set = self.eval_set if eval_set is None else eval_set
        model.eval()
        n = min(t.eval_samples, len(eval_set))
        acc = torch.zeros(4, dtype=torch.float64, device=mesh.device)  # loss_sum, tokens, correct, total
        for i in range(mesh.dp_rank, n, mesh.dp_size):  # the ranks of an sp group share sample i
            sample = collate([eval_set[i]])
            b = self._to_device(sample, [k for k, v in sample.items() if torch.is_tensor(v)])
            with self.autocast:
                h = model.model(b["input_ids"], b["position_ids"], self._docs(b))
                loss, ntok = model.lm_head(h, b["labels"], t.loss_tile_tokens)
                acc[0] += loss.double()
                acc[1] += ntok
                if "answer_mask" in b:  # exact match over answer tokens that may sit on several sp ranks
                    mask = b["answer_mask"]
                    wrong = (model.lm_head(h[mask]).argmax(-1) != b["labels"][mask]).sum()
                    counts = torch.stack([mask.sum(), wrong]).double()
                    if mesh.sp_size > 1:
                        all_reduce_sum(counts, mesh, group=mesh.sp_group)
                    if mesh.sp_rank == 0 and counts[0] > 0:
                        acc[2] += float(counts[1] == 0)
                        acc[3] += 1
        all_reduce_sum(acc, mesh)
        model.train()
        out = {"step": self.step, "eval_loss": (acc[0] / acc[1].clamp(min=1)).item()}
        if acc[3] > 0:
            out["eval_needle_acc"] = (acc[2] / acc[3]).item()
        return out

    # ---- checkpoints --------------------------------------------------------------------------
    def _meta(self, stage_done: bool) -> dict:
        return {"sampler": self.sampler.state_dict(), "model_args": dataclasses.asdict(self.args),
                "wandb_id": self.wandb_id, "stage": self.stage, "stage_done": stage_done, "acc": self.acc.rows,
                "finetune_mode": self.cfg.finetune.mode, "finetune": self.mode.state_dict()}

    def save(self, stage_done: bool = False) -> Path:
        return save_checkpoint(self.ckpt_root, step=self.step, engine=self.engine, mesh=self.mesh,
                               meta=self._meta(stage_done), config_yaml=to_yaml(self.cfg),
                               keep_last=self.cfg.checkpoint.keep_last,
                               files={"finetune.pt": self.mode.tensors()})

    def read_resume(self) -> tuple[Path | None, dict | None]:
        """The checkpoint to resume from and its meta; the mode's state is restored at once (before
        the resumed stage starts, so that stage re-applies what the checkpoint recorded)."""
        path = find_resume(self.cfg.checkpoint.resume, self.ckpt_root)
        if path is None:
            if self.cfg.checkpoint.resume == "auto":
                log.info("checkpoint.resume=auto: no checkpoint in %s, starting fresh", self.ckpt_root)
            return None, None
        meta = json.loads((path / "meta.json").read_text())
        saved_mode = meta.get("finetune_mode", "full")
        if saved_mode != self.cfg.finetune.mode:
            raise ConfigError(f"checkpoint {path} was written with finetune.mode={saved_mode}; this run has "
                              f"{self.cfg.finetune.mode}: resume with the mode that wrote it")
        if meta.get("stage", 0) >= len(self.stages):
            raise ConfigError(f"checkpoint {path} is at stage {meta['stage']}, the recipe has {len(self.stages)} "
                              "stage(s): resume with the recipe that wrote it")
        tensors = torch.load(path / "finetune.pt", weights_only=True) if (path / "finetune.pt").is_file() else {}
        self.mode.load_state_dict(meta.get("finetune", {}), tensors)
        # A stage is finished when its checkpoint reached the stage's end in *this* recipe: a run resumed
        # with more steps (train.steps raised) continues that stage, and re-scores it at its new end.
        stage = meta.get("stage", 0)
        done = meta["step"] >= self.stage_ends[stage]
        rows = meta.get("acc", [])
        self.acc = AccuracyMatrix(self.acc.names, rows[:stage + 1] if done else rows[:stage])
        self.wandb_id = meta.get("wandb_id")
        return path, meta

    def load(self, path: Path) -> None:
        meta = load_checkpoint(path, engine=self.engine, mesh=self.mesh, args=self.args)
        self.step = meta["step"]
        self.sampler.load_state_dict(meta["sampler"])
        log.info("resumed from %s at step %d (stage %d)", path, self.step, self.stage)

    # ---- the run ------------------------------------------------------------------------------
    def write_run_info(self) -> None:
        if not self.mesh.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        sha = git_sha()
        (self.run_dir / "config.yaml").write_text(f"# git_sha: {sha}\n" + to_yaml(self.cfg))
        (self.run_dir / "git_sha.txt").write_text(sha + "\n")

    def run(self) -> dict:
        cfg, mesh, t = self.cfg, self.mesh, self.cfg.train
        path, meta = self.read_resume()
        self.write_run_info()
        logger = RunLogger(self.run_dir, enabled=mesh.is_main, total_steps=self.total_steps,
                           wandb_cfg=cfg.logging.wandb, config_dict=dataclasses.asdict(cfg), wandb_id=self.wandb_id)
        self.wandb_id = logger.wandb_id
        n_params = self.model.num_params()
        cdtype = torch.bfloat16 if t.precision == "bf16" else DTYPES[cfg.model.dtype]
        log.info("model: %.2fM parameters, %d layers, seq_len %d, %d rank(s) (dp %d x sp %d) on %s, kernel %s",
                 n_params / 1e6, self.args.num_hidden_layers, cfg.data.seq_len, mesh.world_size, mesh.dp_size,
                 mesh.sp_size, mesh.device,
                 get_kernel(t.attention_kernel, mesh.device, cdtype).name)
        stop = _StopFlag()
        watchdog = StepWatchdog(cfg.launch.hang_timeout_s, mesh.rank)
        last, final_eval = {}, {}
        first = meta["stage"] if meta else 0
        try:
            for i in range(first, len(self.stages)):
                rec = self.begin_stage(i)
                if meta is not None and i == first:
                    self.load(path)  # into the engine built for the stage the checkpoint was in
                    if self.step >= self.stage_ends[i]:
                        continue
                else:
                    logger.log_step(rec)
                stage_start = self.stage_ends[i] - self.stages[i].steps
                while self.step < self.stage_ends[i]:
                    watchdog.arm(self.step + 1)
                    last = self.train_step()
                    watchdog.disarm()
                    self.step_times.append(last["step_time_s"])
                    logger.log_step(last)
                    if self.step % t.log_interval == 0 or self.step == self.total_steps:
                        logger.progress(last)
                    extra = self.mode.on_step_end(self, self.step)
                    if extra:
                        logger.log_step({"step": self.step, "stage": i, **extra})
                    in_stage = self.step - stage_start
                    if t.eval_interval and in_stage % t.eval_interval == 0 and self.step < self.stage_ends[i]:
                        logger.log_eval(self.evaluate())
                    flag = all_reduce_sum(torch.tensor([float(stop.signum)], device=mesh.device), mesh).item()
                    if flag:
                        log.warning("signal received: saving a checkpoint at step %d and exiting", self.step)
                        self.save()
                        return {**last, "preempted": True, "step": self.step, "signal": int(flag)}
                    if (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0
                            and self.step < self.stage_ends[i]):
                        self.save()
                final_eval = self.end_stage(i, logger)
                self.save(stage_done=True)
            if cfg.checkpoint.export_hf:
                state = self.engine.full_state_dict()  # collective under ZeRO-3
                if mesh.is_main:
                    save_hf(self.model, self.run_dir / "hf", state_dict=state)
                    log.info("exported HF safetensors to %s", self.run_dir / "hf")
            cl = self.acc.record() if self.acc.rows else {}
            return {"preempted": False, **last, **final_eval, "step": self.step,
                    **{k: v for k, v in cl.items() if k in ("op", "bwt")}}
        finally:
            watchdog.disarm()
            stop.restore()
            logger.close()
            if self.plan_runtime is not None:  # on every rank (each plans its own requests), also after an error
                self.plan_runtime.save_report()


def _is_comm_error(e: RuntimeError) -> bool:
    """A failed or timed-out collective (NCCL raises DistError; gloo plain RuntimeErrors)."""
    text = str(e)
    return isinstance(e, torch.distributed.DistError) or any(
        s in text for s in ("Timed out", "Connection closed by peer", "Connection reset", "NCCL", "gloo"))


def run_training(cfg: Config) -> dict:
    """Entry point of every rank (single process, torchrun, or the CLI's own launcher).

    User errors found only here (a checkpoint that does not fit) print one line and exit with code 2;
    a collective that times out (a dead or hung peer) says so, names the timeout, and exits with 1.
    """
    from longtrain.memory.arena import configure_cuda_allocator

    allocator = configure_cuda_allocator(cfg)  # before CUDA starts (NCCL's init allocates)
    mesh = init_mesh(cfg.train.device, cfg.launch.backend, cfg.launch.timeout_s,
                     need_group=cfg.parallel.engine == "deepspeed", sp_degree=cfg.parallel.sp.degree)
    setup_logging(mesh.rank)
    if mesh.device.type == "cuda":
        log.info("CUDA allocator: %s", allocator)
    torch.manual_seed(cfg.train.seed)
    try:
        trainer = Trainer(cfg, mesh)
        summary = trainer.run()
        summary.setdefault("signal", 15)
        return summary
    except ConfigError as e:
        print(f"longtrain: error (rank {mesh.rank}): {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except RuntimeError as e:
        if not _is_comm_error(e):
            raise
        print(f"longtrain: rank {mesh.rank}: a collective failed or did not finish within launch.timeout_s="
              f"{cfg.launch.timeout_s}s: a peer rank died or hangs ({str(e).strip().splitlines()[0][:300]})",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
