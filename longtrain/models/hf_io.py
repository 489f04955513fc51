"""Hugging Face checkpoint I/O: config.json <-> LlamaArgs, sharded safetensors <-> state dict.

Parameter names are HF's (`model.layers.0.self_attn.q_proj.weight`, ...), so a folder written here
loads with `transformers.AutoModelForCausalLM.from_pretrained` and vice versa.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longtrain.models.presets import LlamaArgs

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
           "max_position_embeddings", "tie_word_embeddings", "attention_bias")


def args_from_hf_config(hf: dict, source: str = "config.json") -> LlamaArgs:
    mtype = hf.get("model_type", "llama")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {mtype!r} is not a Llama-family decoder; supported: {SUPPORTED_MODEL_TYPES}")
    if hf.get("sliding_window") and hf.get("use_sliding_window", mtype == "mistral"):
        raise ValueError(f"{source}: sliding-window attention ({hf['sliding_window']}) is not supported; "
                         "set sliding_window to null for full attention")
    kw = {k: hf[k] for k in _FIELDS if k in hf and hf[k] is not None}
    kw.setdefault("num_key_value_heads", hf["num_attention_heads"])
    if mtype == "qwen2":
        kw["attention_bias"] = True  # Qwen2 has q/k/v biases without saying so in config.json
    if "rope_theta" not in kw and isinstance(hf.get("rope_parameters"), dict):  # transformers >= 5 layout
        rp = dict(hf["rope_parameters"])
        kw["rope_theta"] = rp.pop("rope_theta", 10000.0)
        if rp.get("rope_type", "default") != "default":
            kw["rope_scaling"] = rp
    return LlamaArgs(model_type=mtype, **kw)


def args_to_hf_config(args: LlamaArgs, dtype: torch.dtype) -> dict:
    cfg = {k: getattr(args, k) for k in _FIELDS}
    cfg["head_dim"] = args.hd
    cfg.update(model_type=args.model_type, architectures=[_ARCH[args.model_type]], hidden_act="silu",
               mlp_bias=False, torch_dtype=str(dtype).removeprefix("torch."), bos_token_id=None,
               eos_token_id=None)
    return cfg


_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def read_hf_config(folder: str | os.PathLike) -> LlamaArgs:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json: point model.pretrained at an HF checkpoint folder")
    return args_from_hf_config(json.loads(path.read_text()), source=str(path))


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no *.safetensors weights")
    return files


def load_hf_state_dict(folder: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(folder)):
        with safe_open(str(f), framework="pt", device=str(device)) as fh:
            for name in fh.keys():
                sd[name] = fh.get_tensor(name)
    return sd


def load_hf_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Copy HF weights into `model` (already materialised on its device), checking names and shapes."""
    sd = load_hf_state_dict(folder)
    own = model.state_dict()
    tied = getattr(model.args, "tie_word_embeddings", False)
    if tied:
        sd.pop("lm_head.weight", None)
        own.pop("lm_head.weight", None)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(own) if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in own.items():
        if sd[name].shape != t.shape:
            raise ValueError(f"{folder}: {name} has shape {tuple(sd[name].shape)}, the model expects {tuple(t.shape)}")
        with torch.no_grad():
            t.copy_(sd[name])


def save_hf(model: torch.nn.Module, folder: str | os.PathLike, state_dict: dict | None = None,
            max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json + safetensors shards (+ index when sharded) atomically into `folder`."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in (state_dict or model.state_dict()).items()}
    if model.args.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # HF stores tied weights once
    dtype = next(iter(sd.values())).dtype
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(sd):
        nbytes = sd[name].numel() * sd[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = sd[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(args_to_hf_config(model.args, dtype), indent=2))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
