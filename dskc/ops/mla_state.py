"""The per-step state of paged MLA attention and mla_decode's split-KV schedule (stem mla_step, one launch).

`mla_step` gives a step's rope rows, cache slots, sequence lengths and schedule for every layer at once (an
MLAStep); `get_mla_metadata` (FlashMLA's name) the schedule alone from given sequence lengths. Both run
templates/triton/mla_step.py; no host sync except the optional check of device positions.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from dskc.arch import family_of_device
from dskc.ops import _config as _cfg
from dskc.ops._validate import should_validate as _should_validate
from dskc.templates.triton import mla_decode as _dec
from dskc.templates.triton import mla_step as _step

__all__ = ["MLAMetadata", "MLAStep", "get_mla_metadata", "mla_step"]

D_LATENT = _dec.D_LATENT
FIXED_OVERHEAD_TILES = 5   # a split costs about this many key tiles of setup + combine (FlashMLA uses 5 of 64)


@dataclasses.dataclass(frozen=True)
class MLAMetadata:
    """Split-KV schedule for one (seqlens, rows) decode shape; reusable while seqlens and shapes stay the same.

    tile_scheduler_metadata: int32 [num_parts, 8]; row p = (begin_batch, begin_tile, end_batch, end_tile (excl.),
        split index of the begin batch's piece, block_n, 0, 0). Part p handles batch begin_batch from tile
        begin_tile, the batches in between whole, and batch end_batch up to end_tile.
    num_splits: int32 [batch + 1], cumulative pieces per batch (num_splits[b+1] - num_splits[b] pieces; 0 for an
        empty sequence, 1 means the batch is written without a combine).
    combine: False for a schedule of one part per sequence (split=False): nothing to merge, so mla_decode launches
        no combine kernel.
    """
    tile_scheduler_metadata: torch.Tensor
    num_splits: torch.Tensor
    block_m: int
    block_n: int
    num_q_rows: int
    combine: bool = True


@dataclasses.dataclass(frozen=True)
class MLAStep:
    """The per-step state of paged MLA attention (mla_step): shared by every layer of a step.

    rope_rows int32 [T]: each new token's row of the rope table; slots int32 [T]: its flat cache slot (page id *
    page + offset; -1 past the block table); seqlens int32 [batch]: cache lengths after the step; metadata: the
    split-KV schedule of mla_decode over those lengths. T = batch * s_q, token b * s_q + s is sequence b's s-th."""
    batch: int
    s_q: int
    rope_rows: torch.Tensor
    slots: torch.Tensor
    seqlens: torch.Tensor
    metadata: MLAMetadata


def default_config(device: torch.device) -> dict:
    """The tuning-free decode config of `device`'s arch family (sm90's for CPU tensors under the interpreter)."""
    return dict(_dec.DEFAULTS[family_of_device(device)])


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few parts, so split-KV and the combine are exercised


def _num_parts(device, num_q_rows: int, block_m: int, block_dv: int) -> int:
    """FlashMLA's part count: the SMs over the programs one part needs (row blocks x value splits)."""
    programs_per_part = math.ceil(num_q_rows / block_m) * (D_LATENT // block_dv)
    return max(1, _num_sms(device) // programs_per_part)


def _launch_step(device, batch: int, s_q: int, num_q_rows: int, *, split: bool, block_n: int, num_parts: int,
                 overhead_tiles: int, block_m: int, mode: int, starts=None, start0: int = 0, seqlens=None,
                 block_table=None, page_size: int = 64, rope_base: int = 0, config=None):
    """One mla_step launch (templates/triton/mla_step.py); returns (rope_rows, slots, seqlens, MLAMetadata)."""
    parts = num_parts if split else max(batch, 1)
    i32 = dict(dtype=torch.int32, device=device)
    t = batch * s_q
    rope_rows, slots = torch.empty(t, **i32), torch.empty(t, **i32)
    out_seqlens = seqlens if mode == 0 else torch.empty(batch, **i32)
    meta = torch.empty(parts, _step.META_COLS, **i32)
    cum = torch.empty(batch + 1, **i32)
    work = torch.empty(max(3 * batch, 1), **i32)
    problem = _step.Problem(max(batch, 1), max(s_q, 1), page_size, int(split), int(mode != 0))
    cfg = _cfg.resolve(_step.STEM, device, config, problem)
    bt = block_table if block_table is not None else cum
    starts_t = starts if starts is not None else cum
    _step.mla_step_kernel[(1,)](
        starts_t, seqlens if mode == 0 else cum, bt, rope_rows, slots, out_seqlens, meta, cum, work,
        mode, int(start0), batch, s_q, bt.stride(0) if block_table is not None else 0,
        bt.shape[1] if block_table is not None else 0, int(rope_base), parts, int(block_n), int(overhead_tiles),
        **_step.bind(problem, cfg)["mla_step_kernel"])
    md = MLAMetadata(meta, cum, block_m, block_n, num_q_rows, combine=bool(split))
    return rope_rows, slots, out_seqlens, md


def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_rows: int, num_heads_k: int = 1, *, block_m=None,
                     block_n=None, block_dv=None, num_parts: int | None = None,
                     overhead_tiles: int = FIXED_OVERHEAD_TILES, split: bool = True, config=None) -> MLAMetadata:
    """Balance the decode work of a batch over `num_parts` parts (default: SMs / (row blocks x value splits)).

    cache_seqlens: int32 [batch]; num_q_rows: s_q * h_q / num_heads_k (query rows sharing one kv head).
    Work is counted in key tiles of block_n tokens plus `overhead_tiles` per batch; part p takes the units
    [p*P, (p+1)*P) of the batches laid end to end, P = ceil(total / num_parts). split=False: one part per sequence
    (no combine; MLAMetadata.combine False). One mla_step launch, no host sync.
    """
    if cache_seqlens.dim() != 1 or cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be a 1-D int32 tensor, got {cache_seqlens.dtype} "
                        f"{tuple(cache_seqlens.shape)}")
    if num_heads_k != 1:
        raise ValueError(f"MLA decode has one kv head; got num_heads_k={num_heads_k}")
    if num_q_rows < 1:
        raise ValueError(f"num_q_rows must be >= 1, got {num_q_rows}")
    cfg = default_config(cache_seqlens.device)
    block_m = int(block_m or cfg["BLOCK_M"])
    block_n = int(block_n or cfg["BLOCK_N"])
    block_dv = int(block_dv or cfg["BLOCK_DV"])
    if num_parts is None:
        num_parts = _num_parts(cache_seqlens.device, num_q_rows, block_m, block_dv)
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    return _launch_step(cache_seqlens.device, cache_seqlens.shape[0], 1, num_q_rows, split=split, block_n=block_n,
                        num_parts=num_parts, overhead_tiles=overhead_tiles, block_m=block_m, mode=0,
                        seqlens=cache_seqlens.contiguous(), config=config)[3]


def mla_step(block_table: torch.Tensor, page_size: int, batch: int, s_q: int, num_q_rows: int, *, starts=None,
             start: int = 0, rope_base: int = 0, split: bool = True, decode_config: dict | None = None,
             num_parts: int | None = None, config=None, validate=None) -> MLAStep:
    """The per-step state of a paged MLA step, for every layer at once (one launch; templates/triton/mla_step.py).

    block_table int32 [>= batch, max_blocks] (rows 0..batch-1 are used); the step adds s_q tokens to each of `batch`
    sequences starting at `starts` (int32 [batch] device positions, as a CUDA-graph decode step) or at `start` (one
    host int for all). rope_base: the position of the rope table's row 0 as the layers see it (a table sliced from
    start: start; the whole table: 0). num_q_rows = s_q * h_q; decode_config: mla_decode's config (BLOCK_M /
    BLOCK_N / BLOCK_DV shape the schedule; default: the device's tuning-free one); split: the balanced split-KV
    schedule (with a combine) or one part per sequence (no combine). validate: device positions are checked to lie
    in the block table (one sync) unless False or a CUDA graph is being captured; unchecked, a token past the block
    table gets slot -1 (never written).
    """
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] < batch \
            or block_table.stride(-1) != 1:
        raise TypeError(f"block_table must be int32 [>= {batch}, max_blocks] with a unit last stride, got "
                        f"{block_table.dtype} {tuple(block_table.shape)}")
    if batch < 1 or s_q < 1 or num_q_rows < 1:
        raise ValueError(f"batch, s_q and num_q_rows must be >= 1, got {batch}, {s_q}, {num_q_rows}")
    cap = block_table.shape[1] * page_size
    dev = block_table.device
    if starts is not None:
        if starts.dtype != torch.int32 or tuple(starts.shape) != (batch,) or starts.device != dev:
            raise TypeError(f"starts must be int32 [{batch}] on {dev}, got {starts.dtype} {tuple(starts.shape)} "
                            f"on {starts.device}")
        if _should_validate(validate, dev) and bool(((starts < 0) | (starts + s_q > cap)).any()):
            raise ValueError(f"positions outside the block table's 0..{cap - s_q}: {starts.tolist()}")
    elif not 0 <= int(start) <= cap - s_q:
        raise ValueError(f"start {start} + {s_q} tokens does not fit the block table's {cap} positions")
    dcfg = {**default_config(dev), **(decode_config or {})}
    if num_parts is None:
        num_parts = _num_parts(dev, num_q_rows, dcfg["BLOCK_M"], dcfg["BLOCK_DV"])
    rope_rows, slots, seqlens, md = _launch_step(
        dev, batch, s_q, num_q_rows, split=split, block_n=dcfg["BLOCK_N"], num_parts=num_parts,
        overhead_tiles=FIXED_OVERHEAD_TILES, block_m=dcfg["BLOCK_M"], mode=2 if starts is not None else 1,
        starts=starts, start0=int(start), block_table=block_table, page_size=page_size, rope_base=rope_base,
        config=config)
    return MLAStep(batch, s_q, rope_rows, slots, seqlens, md)
