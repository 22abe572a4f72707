"""Checkpoint layouts (safetensors) and saving; loading streams tensor by tensor (model/loader.py).

deepseek:  `model{rank}-mp{world}.safetensors` with our state_dict names (`layers.0.attn.wq_a.weight`,
           `...scale`), as written by DeepSeek-V3's convert.py.
hf:        `model-0000k-of-0000n.safetensors` shards + `model.safetensors.index.json`, names like
           `model.layers.0.self_attn.kv_a_proj_with_mqa.weight`, `...weight_scale_inv`,
           `model.layers.3.mlp.gate.e_score_correction_bias`, `model.embed_tokens.weight`, `lm_head.weight`.
hf-single: one `model.safetensors` with the hf names (what save_pretrained writes for a small model).
Names map segment by segment (a bijection), so both directions are one table. In the hf layouts, layers with
index >= n_layers (DeepSeek-V3's multi-token-prediction module, unused by inference) are skipped with a log line,
as convert.py skips them.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import Transformer

log = logging.getLogger("dskc.model")
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
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


@dataclass(frozen=True)
class Stored:
    """Where one tensor of the model lives: file, its name there (stored), and whether that file is already this
    rank's tensor-parallel part (DeepSeek's model{rank}-mp{world} files) or the whole tensor."""
    file: Path
    stored: str
    presharded: bool = False


def detect_layout(directory: str | os.PathLike) -> str:
    """'hf' (index + shards), 'hf-single' (model.safetensors) or 'deepseek' (model*-mp*.safetensors)."""
    directory = Path(directory)
    if (directory / HF_INDEX).is_file():
        return "hf"
    if (directory / HF_SINGLE).is_file():
        return "hf-single"
    if any(_DS_FILE.fullmatch(p.name) for p in directory.glob("*.safetensors")):
        return "deepseek"
    raise ValueError(f"{directory}: no checkpoint found (neither {HF_INDEX}, {HF_SINGLE} nor "
                     "model*-mp*.safetensors)")


def _hf_weight_map(directory: Path, layout: str) -> dict[str, str]:
    """hf name -> shard file name."""
    if layout == "hf-single":
        with safe_open(str(directory / HF_SINGLE), framework="pt", device="cpu") as f:
            return {k: HF_SINGLE for k in f.keys()}
    try:
        weight_map = json.loads((directory / HF_INDEX).read_text()).get("weight_map")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / HF_INDEX} is not valid JSON: {exc}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{directory / HF_INDEX} has no 'weight_map' object")
    return weight_map


def _hf_index(directory: Path, layout: str, n_layers: int) -> dict[str, Stored]:
    index, mtp = {}, {}
    for hf_name, fname in _hf_weight_map(directory, layout).items():
        m = re.match(r"model\.layers\.(\d+)\.", hf_name)
        if m and int(m.group(1)) >= n_layers:
            mtp.setdefault(int(m.group(1)), []).append(hf_name)
            continue
        index[from_hf_name(hf_name)] = Stored(directory / fname, hf_name)
    if mtp:
        log.info("dskc.model: skipping %d tensors of layer(s) %s in %s: the multi-token-prediction module "
                 "(num_nextn_predict_layers), which inference does not use", sum(map(len, mtp.values())),
                 sorted(mtp), directory)
    return index


def _deepseek_index(directory: Path, rank: int, world_size: int) -> dict[str, Stored]:
    own = directory / f"model{rank}-mp{world_size}.safetensors"
    full = directory / "model0-mp1.safetensors"
    path = own if own.is_file() else full if full.is_file() else None
    if path is None:
        found = sorted(p.name for p in directory.glob("model*-mp*.safetensors"))
        raise ValueError(f"{directory}: need {own.name} or {full.name} for world size {world_size}, found {found}")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: Stored(path, k, presharded=path == own and world_size > 1) for k in f.keys()}


def checkpoint_index(directory: str | os.PathLike, n_layers: int, rank: int = 0,
                     world_size: int = 1) -> dict[str, Stored]:
    """Our state_dict name -> where it is stored, for any layout (reads file headers and the index only)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {directory} does not exist")
    layout = detect_layout(directory)
    if layout == "deepseek":
        return _deepseek_index(directory, rank, world_size)
    return _hf_index(directory, layout, n_layers)
