"""Streaming checkpoint load: every file header is checked first (names, shapes, dtypes, FP8 scales) before any
tensor is read, then the tensors are read one at a time, file by file.

A parameter still on the meta device (a model built with device="meta", as from_pretrained does) is replaced by the
tensor as it is read, so no second copy of the weights ever exists; a materialised parameter is copied into. Only
the tensors the model holds are read: routed experts of other tensor-parallel ranks and the multi-token-prediction
layers are not (a tensor-parallel slice is read as a slice).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from .checkpoint import Stored, checkpoint_index, to_hf_name
from .fp8 import FP8_DTYPE, quantize_weight
from .mla import precompute_rope
from .model import Transformer
from .parallel import expert_index, split_dim

_DTYPES = {"F8_E4M3": FP8_DTYPE, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
           "F64": torch.float64}
_SHOW = 12   # names listed in an error before "..."


@dataclass(frozen=True)
class _Read:
    """One parameter to read: our name, where it is, the TP dimension to slice (None: whole), and whether the
    stored float weight is quantised to FP8 here (its `.scale` is then made, not read)."""
    name: str
    at: Stored
    dim: int | None
    quantize: bool = False


def _listing(names) -> str:
    names = sorted(names)
    return repr(names[:_SHOW])[:-1] + (f", ... {len(names) - _SHOW} more]" if len(names) > _SHOW else "]")


def _stored_names(names, index: dict[str, Stored]) -> str:
    """Our names with the names a Hugging Face checkpoint gives them (for errors about tensors not in it)."""
    hf = any(s.stored.startswith(("model.", "lm_head.")) for s in index.values())
    return _listing(names) + (f" (stored as {_listing(to_hf_name(n) for n in names)})" if hf else "")


def _headers(index: dict[str, Stored], names) -> dict[str, tuple[torch.dtype | str, tuple[int, ...]]]:
    """(dtype, shape) of each named tensor from the file headers alone, one open per file."""
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(index[n].file, []).append(n)
    out = {}
    for path, group in by_file.items():
        if not path.is_file():
            raise ValueError(f"shard {path.name} is missing from {path.parent} (the index names it for "
                             f"{_listing(index[n].stored for n in group)})")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for n in group:
                if index[n].stored not in keys:
                    raise ValueError(f"{path.name} does not hold {index[n].stored!r}, which the index puts there")
                sl = f.get_slice(index[n].stored)
                out[n] = (_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape()))
    return out


def _check_names(model: Transformer, params: dict, index: dict[str, Stored], quantize: bool) -> None:
    local = {n.replace(f"experts.{expert_index(n)}.", "experts.*.") for n in params if expert_index(n) is not None}
    n_routed = model.args.n_routed_experts

    def other_rank_expert(n: str) -> bool:
        e = expert_index(n)
        return e is not None and e < n_routed and n.replace(f"experts.{e}.", "experts.*.") in local

    extra = [index[n].stored for n in index if n not in params and not other_rank_expert(n)]
    if extra:
        raise ValueError(f"checkpoint does not match the model: unexpected keys {_listing(extra)}")
    missing = [n for n in params if n not in index]
    no_scale = [n for n in missing if n.endswith(".scale") and n[:-len("scale")] + "weight" in index]
    if no_scale and not quantize:
        raise ValueError(f"checkpoint does not match the model: missing keys {_stored_names(no_scale, index)}: "
                         "an FP8 weight without its scale (weight_scale_inv in the Hugging Face layout), or a "
                         "float checkpoint for an FP8 model (quantize='fp8' quantises it on load)")
    missing = [n for n in missing if n not in no_scale]
    if missing:
        raise ValueError(f"checkpoint does not match the model: missing keys {_stored_names(missing, index)}")


def _plan(model: Transformer, params: dict, index: dict[str, Stored], quantize: bool) -> list[_Read]:
    _check_names(model, params, index, quantize)
    heads = _headers(index, [n for n in params if n in index])
    ws, reads, bad_shape, bad_kind = model.tp.world_size, [], {}, []
    for name, p in params.items():
        if name not in heads:
            continue   # an FP8 scale made by quantising its weight (checked in _check_names)
        dtype, shape = heads[name]
        dim = None if index[name].presharded or ws == 1 else split_dim(name)
        if dim is not None and expert_index(name) is None and dim < p.dim():
            want = tuple(s * ws if i == dim else s for i, s in enumerate(p.shape))
        else:
            dim, want = None, tuple(p.shape)
        if shape != want:
            bad_shape[index[name].stored] = (shape, want)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{index[name].stored} is stored as {dtype}: dskc reads float (f32/f16/bf16) and "
                             "float8_e4m3fn tensors")
        q = quantize and p.dtype == FP8_DTYPE and dtype != FP8_DTYPE
        if dtype == FP8_DTYPE and name.endswith(".weight") and name[:-len("weight")] + "scale" not in index:
            raise ValueError(f"{index[name].stored} is float8_e4m3fn but has no scale (weight_scale_inv in the "
                             "Hugging Face layout) in the checkpoint")
        if (dtype == FP8_DTYPE) != (p.dtype == FP8_DTYPE) and not q:
            bad_kind.append((index[name].stored, str(dtype), str(p.dtype)))
        if q and name[:-len("weight")] + "scale" in index:
            raise ValueError(f"{index[name].stored} is {dtype} but has a stored scale: not an FP8 checkpoint "
                             "to quantise on load")
        reads.append(_Read(name, index[name], dim, q))
    if bad_shape:
        raise ValueError(f"checkpoint shapes differ from the model (checkpoint, model): {bad_shape}")
    if bad_kind:
        raise ValueError(f"fp8 vs non-fp8 dtype mismatch (checkpoint, model): {bad_kind[:_SHOW]}; a float "
                         "checkpoint loads into an FP8 model with quantize='fp8'")
    return reads


def _put(model: nn.Module, name: str, value: torch.Tensor, device, owned: bool = False) -> None:
    """Set parameter `name` to `value`. A tensor read by safetensors lives in the file's (private) memory map; a
    meta parameter gets its own copy, so the map is released with the file and the model owns its memory."""
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    old = module._parameters[attr]
    if old.is_meta:
        new = value.to(device=device, dtype=old.dtype)
        if not owned and new.data_ptr() == value.data_ptr():
            new = new.clone(memory_format=torch.contiguous_format)
        module._parameters[attr] = nn.Parameter(new.contiguous(), requires_grad=False)
    else:
        with torch.no_grad():
            old.copy_(value)   # float dtypes cast to the model's


def _read_one(f, r: _Read, tp) -> torch.Tensor:
    if r.dim is None:
        return f.get_tensor(r.at.stored)
    sl = f.get_slice(r.at.stored)
    size = sl.get_shape()[r.dim] // tp.world_size
    lo, hi = tp.rank * size, (tp.rank + 1) * size
    return sl[lo:hi] if r.dim == 0 else sl[:, lo:hi]


def _stream(model: Transformer, reads: list[_Read], device) -> None:
    by_file: dict[Path, list[_Read]] = {}
    for r in reads:
        by_file.setdefault(r.at.file, []).append(r)
    for path, group in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for r in group:
                t = _read_one(f, r, model.tp)
                if r.quantize:   # DeepSeek's recipe, exactly model/fp8.py's quantiser on the stored tensor
                    q, s = quantize_weight(t, model.args.scale_fmt)
                    _put(model, r.name, q, device, owned=True)
                    _put(model, r.name[:-len("weight")] + "scale", s, device, owned=True)
                else:
                    _put(model, r.name, t, device)
                del t


def materialize_buffers(model: Transformer, device=None) -> Transformer:
    """Real buffers for a Transformer built on the meta device: the rope table, zeroed KV caches."""
    for name, buf in list(model.named_buffers()):
        if buf is None or not buf.is_meta:
            continue
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        module._buffers[attr] = (precompute_rope(model.args, device) if name == "rope"
                                 else torch.zeros(buf.shape, dtype=buf.dtype, device=device))
    return model


def load_checkpoint(model: Transformer, directory: str | os.PathLike, *, quantize: bool = False,
                    device=None) -> Transformer:
    """Load weights saved in any layout (deepseek, hf, hf-single; detected) into `model`, tensor by tensor.

    At world size > 1 a world-size-1 checkpoint is read as this rank's slices. Float dtypes are cast to the
    model's. FP8-ness must match, except quantize=True: float weights of an FP8 model are quantised on load
    (quantize_weight: 128x128 blocks, the model's scale_fmt). Every name, shape and dtype is checked against the
    file headers before any tensor is read; errors name the tensors. Parameters on the meta device are replaced
    (on `device`, default CPU) and the model's meta buffers made real; others are copied into.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"load_checkpoint needs a dskc.model.Transformer, got {type(model).__name__}")
    tp = model.tp
    index = checkpoint_index(directory, model.args.n_layers, tp.rank, tp.world_size)
    params = dict(model.named_parameters())
    _stream(model, _plan(model, params, index, quantize), device)
    still = [n for n, p in model.named_parameters() if p.is_meta]
    if still:
        raise ValueError(f"parameters left unloaded on the meta device: {_listing(still)}")
    return materialize_buffers(model, device)
