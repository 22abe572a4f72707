"""Save and load checkpoints in DeepSeek's inference layout or the Hugging Face layout (safetensors).

deepseek: `model{rank}-mp{world}.safetensors` with our state_dict names (`layers.0.attn.wq_a.weight`,
          `...scale`), as written by DeepSeek-V3's convert.py.
hf:       `model-0000k-of-0000n.safetensors` shards + `model.safetensors.index.json`, names like
          `model.layers.0.self_attn.kv_a_proj_with_mqa.weight`, `...weight_scale_inv`,
          `model.layers.3.mlp.gate.e_score_correction_bias`, `model.embed_tokens.weight`, `lm_head.weight`.
Names map segment by segment (a bijection), so both directions are one table. In the hf layout, layers with
index >= n_layers (DeepSeek-V3's multi-token-prediction module, unused by inference) are skipped, as convert.py
does; any other unknown, missing or misshapen tensor raises ValueError naming it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .fp8 import FP8_DTYPE
from .model import Transformer
from .parallel import shard_state_dict

HF_INDEX = "model.safetensors.index.json"
_TO_HF = {  # our segment -> hf segment
    "embed": "embed_tokens", "head": "lm_head", "attn": "self_attn", "ffn": "mlp",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
    "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj",
    "scale": "weight_scale_inv", "bias": "e_score_correction_bias",
}
_FROM_HF = {v: k for k, v in _TO_HF.items()}
_DS_FILE = re.compile(r"model(\d+)-mp(\d+)\.safetensors")


def to_hf_name(name: str) -> str:
    """Our state_dict name -> Hugging Face name (`layers.0.ffn.w1.weight` -> `model.layers.0.mlp.gate_proj.weight`)."""
    parts = [_TO_HF.get(p, p) for p in name.split(".")]
    return ".".join(parts) if parts[0] == "lm_head" else "model." + ".".join(parts)


def from_hf_name(name: str) -> str:
    """Hugging Face name -> our state_dict name (inverse of to_hf_name)."""
    if name.startswith("model."):
        name = name[len("model."):]
    elif not name.startswith("lm_head."):
        raise ValueError(f"not a DeepSeek Hugging Face tensor name: {name!r}")
    return ".".join(_FROM_HF.get(p, p) for p in name.split("."))


def _full_state(model: Transformer) -> dict[str, torch.Tensor]:
    if model.tp.world_size != 1:
        raise ValueError("save_checkpoint needs a world-size-1 model (its state_dict is the full checkpoint)")
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: Transformer, directory: str | os.PathLike, layout: str = "deepseek",
                    max_shard_bytes: int = 4 << 30) -> list[Path]:
    """Write the model's weights to `directory` in `layout` ("deepseek" or "hf"); returns the files written.

    hf: tensors are packed into shards of at most max_shard_bytes (one tensor may exceed it alone).
    """
    if layout not in ("deepseek", "hf"):
        raise ValueError(f"layout must be 'deepseek' or 'hf', got {layout!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _full_state(model)
    if layout == "deepseek":
        path = directory / "model0-mp1.safetensors"
        save_file(state, str(path))
        return [path]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][to_hf_name(name)] = t
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname))
        files.append(directory / fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + [directory / HF_INDEX]


def _read(path: Path, names=None) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in (names if names is not None else f.keys())}


def _read_hf(directory: Path, n_layers: int) -> dict[str, torch.Tensor]:
    weight_map = json.loads((directory / HF_INDEX).read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{directory / HF_INDEX} has no 'weight_map' object")
    by_file: dict[str, list[str]] = {}
    for hf_name, fname in weight_map.items():
        m = re.match(r"model\.layers\.(\d+)\.", hf_name)
        if m and int(m.group(1)) >= n_layers:
            continue  # multi-token-prediction layer(s): not part of the inference model
        by_file.setdefault(fname, []).append(hf_name)
    state = {}
    for fname, names in by_file.items():
        if not (directory / fname).is_file():
            raise ValueError(f"{HF_INDEX} names shard {fname!r}, which is not in {directory}")
        state.update({from_hf_name(k): v for k, v in _read(directory / fname, names).items()})
    return state


def _read_deepseek(directory: Path, model: Transformer) -> tuple[dict[str, torch.Tensor], bool]:
    """Returns (state, already_sharded): this rank's own file if present, else the world-size-1 file."""
    tp = model.tp
    own = directory / f"model{tp.rank}-mp{tp.world_size}.safetensors"
    if own.is_file():
        return _read(own), True
    full = directory / "model0-mp1.safetensors"
    if full.is_file():
        return _read(full), False
    found = sorted(p.name for p in directory.glob("model*-mp*.safetensors"))
    raise ValueError(f"{directory}: need {own.name} or model0-mp1.safetensors for world size {tp.world_size}, "
                     f"found {found}")


def detect_layout(directory: str | os.PathLike) -> str:
    """'hf' when the safetensors index exists, 'deepseek' when model*-mp*.safetensors files exist."""
    directory = Path(directory)
    if (directory / HF_INDEX).is_file():
        return "hf"
    if any(_DS_FILE.fullmatch(p.name) for p in directory.glob("*.safetensors")):
        return "deepseek"
    raise ValueError(f"{directory}: no checkpoint found (neither {HF_INDEX} nor model*-mp*.safetensors)")


def _check_and_copy(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"checkpoint does not match the model: missing keys {missing}, unexpected keys {extra}")
    bad_shape = {k: (tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape}
    if bad_shape:
        raise ValueError(f"checkpoint shapes differ from the model (checkpoint, model): {bad_shape}")
    bad_kind = [k for k, v in own.items() if (state[k].dtype == FP8_DTYPE) != (v.dtype == FP8_DTYPE)]
    if bad_kind:
        raise ValueError(f"fp8 vs non-fp8 dtype mismatch (a bf16 checkpoint for an fp8 model or the reverse): "
                         f"{[(k, state[k].dtype, own[k].dtype) for k in bad_kind]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])  # other float dtypes are cast to the model's dtype


def load_checkpoint(model: Transformer, directory: str | os.PathLike) -> Transformer:
    """Load weights saved in either layout (detected) into `model`; at world size > 1 a world-size-1
    checkpoint is sharded for this rank. Float dtypes are cast to the model's; fp8-ness must match."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {directory} does not exist")
    if detect_layout(directory) == "hf":
        state, sharded = _read_hf(directory, model.args.n_layers), False
    else:
        state, sharded = _read_deepseek(directory, model)
    if not sharded:
        state = shard_state_dict(state, model.args, model.tp)
    _check_and_copy(model, state)
    return model
