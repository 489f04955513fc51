"""Load a recipe: YAML file + key=value overrides -> validated, typed `Config`.

Errors a user can make (unknown key, wrong type, impossible combination) raise `ConfigError`
whose message names the key, the value and the fix; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from longtrain.config.schema import PLANNER_FALLBACKS, PLANNER_MIP_SOLVERS, PLANNER_REUSE_AFTER, Config, DataConfig

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # longtrain/recipes: the repo's recipes/, shipped in the wheel


class ConfigError(ValueError):
    """A user error in a recipe or override: printed without a traceback, exit code 2."""


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe is a YAML path, or the name of one in recipes/ (`quickstart` -> recipes/quickstart.yaml)."""
    p = Path(recipe)
    if p.is_file():
        return p
    named = RECIPES_DIR / f"{recipe}.yaml"
    if named.is_file():
        return named
    known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    hint = difflib.get_close_matches(recipe, known, n=1)
    msg = f"recipe {recipe!r} not found: give a YAML path or one of {known}"
    if hint:
        msg += f" (did you mean {hint[0]!r}?)"
    raise ConfigError(msg)


def _check_keys(node: Any, schema_cls: type, prefix: str) -> None:
    """Refuse unknown keys before OmegaConf sees them, naming the closest valid key."""
    if not isinstance(node, dict):
        raise ConfigError(f"{prefix or 'recipe'} must be a mapping of keys, got {type(node).__name__}: {node!r}")
    fields = {f.name: f for f in dataclasses.fields(schema_cls)}
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{path}'{hint}; valid keys here: {', '.join(fields)}")
        ftype = fields[key].type
        sub = _dataclass_type(ftype)
        if sub is not None and value is not None:
            _check_keys(value, sub, path)
        item = _list_item_type(ftype)
        if item is not None and value is not None:
            if not isinstance(value, list):
                raise ConfigError(f"{path} must be a list, got {type(value).__name__}: {value!r}")
            for i, v in enumerate(value):
                _check_keys(v, item, f"{path}[{i}]")
        if path.startswith("stages[") and key == "data" and value is not None:
            _check_keys(value, DataConfig, path)  # a stage's data keys are those of the data section


def _dataclass_type(ftype: Any) -> type | None:
    import longtrain.config.schema as schema

    if isinstance(ftype, str):  # postponed annotations: resolve names defined in the schema module
        ftype = getattr(schema, ftype, None)
    return ftype if dataclasses.is_dataclass(ftype) else None


def _list_item_type(ftype: Any) -> type | None:
    """`list[SomeDataclass]` (as a postponed annotation string) -> SomeDataclass."""
    if isinstance(ftype, str) and ftype.startswith("list[") and ftype.endswith("]"):
        return _dataclass_type(ftype[5:-1])
    return None


def stage_data(cfg: Config, index: int) -> DataConfig:
    """The data section of stage `index`: the top-level `data` with the stage's `data` keys merged over it."""
    over = cfg.stages[index].data if cfg.stages else {}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg.data), over)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad value in stages[{index}].data: {_first_line(e)}") from None


def _overrides_to_dict(overrides: Sequence[str]) -> dict:
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (example: train.steps=20)")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key (example: train.steps=20)")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key below the value {part!r}")
        node[parts[-1]] = value
    return out


def load_config(recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- recipe YAML <- overrides, checked key by key, typed, then validated."""
    layers = []
    if recipe is not None:
        path = resolve_recipe_path(str(recipe))
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
        _check_keys(data, Config, "")
        layers.append(data)
    ov = _overrides_to_dict(overrides)
    _check_keys(ov, Config, "")
    layers.append(ov)
    base = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(base, *layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"bad value for '{key}': {_first_line(e)}") from None
    validate(cfg)
    return cfg


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}{hint}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config) -> None:
    """Combinations the types cannot express. Runs before any process or device work starts."""
    from longtrain.models.presets import PRESETS

    m, d, t = cfg.model, cfg.data, cfg.train
    if m.pretrained is None:
        _choice("model.preset", m.preset, list(PRESETS))
    elif not (Path(m.pretrained) / "config.json").is_file():
        raise ConfigError(f"model.pretrained={m.pretrained!r} has no config.json: point it at an HF checkpoint folder")
    if m.num_hidden_layers is not None:
        _positive("model.num_hidden_layers", m.num_hidden_layers)
        if m.pretrained is not None:  # the checkpoint's weights fix the depth
            raise ConfigError(f"model.num_hidden_layers={m.num_hidden_layers} with model.pretrained: a checkpoint's "
                              "weights fix the depth; use a model.preset of the same width instead, or drop the override")
    _choice("model.dtype", m.dtype, ["float32", "bfloat16", "float64"])
    _validate_data(d, "data")
    for i in range(len(cfg.stages)):
        _validate_data(stage_data(cfg, i), f"stages[{i}].data")
    for key in ("steps", "micro_batch_size", "grad_accum", "loss_tile_tokens", "log_interval", "eval_samples"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.lr", t.lr)
    _positive("train.peak_tflops", t.peak_tflops)
    _positive("train.grad_clip", t.grad_clip, allow_zero=True)
    _positive("train.eval_interval", t.eval_interval, allow_zero=True)
    _positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    _choice("train.precision", t.precision, ["fp32", "bf16"])
    _choice("train.device", t.device, ["auto", "cpu", "cuda"])
    _choice("train.attention_kernel", t.attention_kernel, ["auto", "math", "cpu_flash", "flash", "cudnn"])
    if t.precision == "bf16" and m.dtype == "float64":
        raise ConfigError("train.precision=bf16 with model.dtype=float64: use model.dtype=float32 (fp32 master weights)")
    act = cfg.memory.activation
    _choice("memory.activation.policy", act.policy, ["none", "recompute", "swap", "auto"])
    from longtrain.memory.swap_plan import SwapPlanError, parse_alpha, parse_layer_policy
    try:
        parse_alpha(act.alpha)
        for i, text in enumerate(act.layers):
            parse_layer_policy(text, f"memory.activation.layers[{i}]")
    except SwapPlanError as e:
        raise ConfigError(str(e)) from None
    if act.keep_last_layers < 0 or act.host_budget_gib < 0 or act.pcie_gbps < 0 or act.layer_fwd_ms < 0:
        raise ConfigError("memory.activation.keep_last_layers, host_budget_gib, pcie_gbps and layer_fwd_ms must be "
                          f">= 0, got {act.keep_last_layers}, {act.host_budget_gib}, {act.pcie_gbps}, "
                          f"{act.layer_fwd_ms}")
    _choice("memory.allocator", cfg.memory.allocator, ["expandable", "default"])
    _choice("memory.planner.fallback", cfg.memory.planner.fallback, list(PLANNER_FALLBACKS))
    _choice("memory.planner.reuse_after", cfg.memory.planner.reuse_after, list(PLANNER_REUSE_AFTER))
    _positive("memory.activation.chunk_tokens", act.chunk_tokens, allow_zero=True)
    _positive("memory.activation.mlp_chunk_tokens", act.mlp_chunk_tokens, allow_zero=True)
    _positive("memory.planner.time_limit_s", cfg.memory.planner.time_limit_s)
    _choice("memory.planner.mip_solver", cfg.memory.planner.mip_solver, list(PLANNER_MIP_SOLVERS))
    if cfg.memory.planner.mip_solver == "highs":  # installed here? (the process that plans loads this config)
        from longtrain.memory.planner.core import mip_solver_name

        try:
            mip_solver_name("highs")
        except ValueError as e:
            raise ConfigError(f"memory.planner.{e}") from None
    _positive("memory.planner.record_iteration", cfg.memory.planner.record_iteration, allow_zero=True)
    _positive("memory.planner.warmup_overflow_gib", cfg.memory.planner.warmup_overflow_gib, allow_zero=True)
    _validate_finetune(cfg)
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, ["online", "offline", "disabled"])
    _positive("checkpoint.interval", cfg.checkpoint.interval, allow_zero=True)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    r = cfg.checkpoint.resume
    if r is not None and r != "auto" and not Path(r).is_dir():
        raise ConfigError(f"checkpoint.resume={r!r}: use 'auto' or the path of a checkpoint folder")
    pa = cfg.parallel
    _positive("parallel.sp.degree", pa.sp.degree)
    _choice("parallel.sp.method", pa.sp.method, ["ring", "ring_bidir", "token_ring", "ulysses"])
    _choice("parallel.sp.layout", pa.sp.layout, ["zigzag", "contiguous"])
    if pa.sp.degree > 1:
        from longtrain.parallel.sharding import check_layout

        try:
            check_layout(d.seq_len, pa.sp.degree, pa.sp.layout)
        except ValueError as e:
            raise ConfigError(f"data.seq_len with parallel.sp.degree={pa.sp.degree}: {e}") from None
    _choice("parallel.engine", pa.engine, ["deepspeed", "torch"])
    if pa.engine == "deepspeed":
        _choice("parallel.zero_stage", pa.zero_stage, [0, 1, 2, 3])
        if pa.offload_optimizer and pa.zero_stage == 0:
            raise ConfigError("parallel.offload_optimizer=true needs parallel.zero_stage >= 1")
        if pa.offload_params and pa.zero_stage != 3:
            raise ConfigError(f"parallel.offload_params=true needs parallel.zero_stage=3 (got {pa.zero_stage})")
    elif pa.offload_optimizer or pa.offload_params or pa.zero_stage not in (0, 2):
        raise ConfigError("parallel.zero_stage / offload_* need parallel.engine=deepspeed "
                          f"(engine={pa.engine!r} replicates all states)")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in cfg.deepspeed:
            raise ConfigError(f"deepspeed.{key} is derived from train.micro_batch_size / train.grad_accum: set those")
    _positive("launch.nproc", cfg.launch.nproc)
    _choice("launch.backend", cfg.launch.backend, ["auto", "gloo", "nccl"])
    _positive("launch.timeout_s", cfg.launch.timeout_s)
    _positive("launch.hang_timeout_s", cfg.launch.hang_timeout_s, allow_zero=True)
    pl = cfg.memory.planner
    if pl.enabled and pl.time_limit_s > cfg.launch.timeout_s / 2:
        raise ConfigError(f"memory.planner.time_limit_s={pl.time_limit_s:g} is more than half of launch.timeout_s="
                          f"{cfg.launch.timeout_s}: while a rank plans, the others wait in a collective that "
                          "fails after launch.timeout_s; lower the first or raise the second")


def _validate_data(d: DataConfig, prefix: str) -> None:
    _choice(f"{prefix}.source", d.source, ["needle", "keymap", "jsonl", "text", "memmap"])
    _choice(f"{prefix}.memmap_dtype", d.memmap_dtype, ["uint16", "uint32", "int32"])
    _choice(f"{prefix}.needle.loss_on", d.needle.loss_on, ["all", "answer"])
    if d.source not in ("needle", "keymap") and not d.paths:
        raise ConfigError(f"{prefix}.source={d.source!r} needs {prefix}.paths (a list of files)")
    for p in d.paths:
        if not Path(p).exists():
            raise ConfigError(f"{prefix}.paths: {p!r} does not exist")
    if d.tokenizer != "byte" and not Path(d.tokenizer).is_file():
        raise ConfigError(f"{prefix}.tokenizer={d.tokenizer!r}: use 'byte' or the path of a local tokenizer.json")
    _positive(f"{prefix}.seq_len", d.seq_len)
    if not 0 < d.eval_fraction < 1:
        raise ConfigError(f"{prefix}.eval_fraction={d.eval_fraction} must be in (0, 1)")
    if d.source == "keymap":
        from longtrain.data.keymap import MAX_TASKS

        if not 0 <= d.keymap.task < MAX_TASKS:
            raise ConfigError(f"{prefix}.keymap.task={d.keymap.task}: use 0..{MAX_TASKS - 1} (the tag is one digit)")
        if not 2 <= d.keymap.n_keys <= 26:
            raise ConfigError(f"{prefix}.keymap.n_keys={d.keymap.n_keys}: use 2..26 (keys are the letters a..z)")


def _validate_finetune(cfg: Config) -> None:
    from longtrain.finetune import MODES

    f = cfg.finetune
    _choice("finetune.mode", f.mode, list(MODES))
    names = set()
    for i, st in enumerate(cfg.stages):
        _positive(f"stages[{i}].steps", st.steps, allow_zero=True)
        _positive(f"stages[{i}].lr", st.lr, allow_zero=True)
        src = stage_data(cfg, i).source
        if src not in ("needle", "keymap"):
            raise ConfigError(f"stages[{i}].data.source={src!r}: stages are scored by answer accuracy (the accuracy "
                              "matrix, OP, BWT), which needs a task with answers: use needle or keymap")
        name = st.name or f"task{i}"
        if name in names:
            raise ConfigError(f"stages[{i}].name={name!r} is used twice: give every stage its own name")
        names.add(name)
    fp = f.fpf
    _choice("finetune.fpf.select", fp.select, ["topk", "threshold"])
    for key in ("top_k", "replay_tokens", "steps", "micro_batch_size", "k", "lr"):
        _positive(f"finetune.fpf.{key}", getattr(fp, key))
    _positive("finetune.fpf.threshold", fp.threshold, allow_zero=True)
    if f.mode in ("fpf", "kfpf"):
        longest = max([cfg.data.seq_len] + [stage_data(cfg, i).seq_len for i in range(len(cfg.stages))])
        if fp.replay_tokens < longest:
            raise ConfigError(f"finetune.fpf.replay_tokens={fp.replay_tokens} holds no sequence of {longest} tokens: "
                              f"set it to a multiple of {longest} (e.g. {64 * longest})")
