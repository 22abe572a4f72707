"""The DeepSeek-V3-style Transformer: embedding, n_layers x (MLA + dense MLP or MoE), RMSNorm, head.

state_dict names equal DeepSeek-V3's inference/model.py Transformer at world size 1; KV caches and the rope
table are non-persistent buffers.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .args import ModelArgs
from .fp8 import quantize_weight
from .mla import MLA, RMSNorm, precompute_rope
from .moe import MLP, MoE, Gate
from .parallel import TP, Linear, ParallelEmbedding, check_parallel

ATTN_IMPLS = ("naive", "absorb")


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, attn_impl: str, *, dtype, tp: TP, device=None):
        super().__init__()
        self.attn = MLA(args, attn_impl, dtype=dtype, tp=tp, device=device)
        if layer_id < args.n_dense_layers:
            self.ffn = MLP(args.dim, args.inter_dim, dtype=dtype, fp8=args.dtype == "fp8", parallel=True, tp=tp,
                           device=device)
        else:
            self.ffn = MoE(args, dtype=dtype, tp=tp, device=device)
        self.attn_norm = RMSNorm(args.dim, dtype=dtype, eps=args.norm_eps, device=device)
        self.ffn_norm = RMSNorm(args.dim, dtype=dtype, eps=args.norm_eps, device=device)

    def forward(self, x, start_pos: int, rope: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), start_pos, rope, mask)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """DeepSeek-V2/V3 decoder with a KV cache of max_batch_size x max_seq_len.

    attn_impl: "absorb" (latent cache, 576 elements/token/layer for V3) or "naive" (per-head K and V).
    dtype: parameters, activations and caches (default bfloat16 like the reference); FP8 Linear weights stay
    e4m3 + fp32 scales and are dequantized exactly to `dtype` when used. The gate bias is float32.
    World size and rank come from torch.distributed when it is initialised (see parallel.py).
    Pick the dtype here, not with .to(dtype): that would also convert the FP8 weights and the float32 rope table.
    gemm_impl: "bf16" (FP8 weights dequantized, activations untouched: the reference's default) or "fp8"
    (activations also rounded through 1x128 e4m3 before each FP8 linear, as the reference's fp8 GEMM path).
    """

    def __init__(self, args: ModelArgs, attn_impl: str = "absorb", *, dtype: torch.dtype = torch.bfloat16,
                 device=None, gemm_impl: str = "bf16"):
        super().__init__()
        if not isinstance(args, ModelArgs):
            raise TypeError(f"args must be ModelArgs, got {type(args).__name__}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise ValueError(f"dtype must be a floating compute dtype (bf16/fp16/fp32/fp64), got {dtype}")
        self.args, self.attn_impl, self.dtype = args, attn_impl, dtype
        self.tp = tp = TP.from_dist()
        check_parallel(args, tp)
        self.embed = ParallelEmbedding(args.vocab_size, args.dim, dtype=dtype, tp=tp, device=device)
        self.layers = nn.ModuleList(Block(i, args, attn_impl, dtype=dtype, tp=tp, device=device)
                                    for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, dtype=dtype, eps=args.norm_eps, device=device)
        self.head = Linear(args.dim, args.vocab_size, dtype=dtype, split="column", tp=tp, device=device)
        self.register_buffer("rope", precompute_rope(args, device=device), persistent=False)
        if gemm_impl not in ("bf16", "fp8"):
            raise ValueError(f"gemm_impl must be 'bf16' or 'fp8', got {gemm_impl!r}")
        for mod in self.modules():
            if isinstance(mod, Linear) and mod.scale is not None:
                mod.quantize_activations = gemm_impl == "fp8"

    def _check_input(self, tokens: torch.Tensor, start_pos: int) -> None:
        a = self.args
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point() \
                or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be a 2-D integer tensor [batch, seqlen], got "
                             f"{getattr(tokens, 'dtype', type(tokens))} {tuple(getattr(tokens, 'shape', ()))}")
        bsz, seqlen = tokens.shape
        if not 1 <= bsz <= a.max_batch_size:
            raise ValueError(f"batch size {bsz} outside 1..max_batch_size ({a.max_batch_size})")
        if seqlen < 1:
            raise ValueError("tokens has no positions (seqlen 0)")
        if not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos must be an int >= 0, got {start_pos!r}")
        if start_pos + seqlen > a.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + seqlen - 1} go past max_seq_len ({a.max_seq_len})")
        if not torch.compiler.is_compiling():  # a host sync; skipped while a compiler traces the model
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= a.vocab_size:
                raise ValueError(f"token ids must lie in [0, {a.vocab_size}), got min {lo}, max {hi}")

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """tokens [bsz, seqlen] at positions start_pos.. -> float32 logits [bsz, vocab_size] of the last position.

        The cache must already hold positions < start_pos of the same batch rows (from earlier calls).
        """
        self._check_input(tokens, start_pos)
        seqlen = tokens.shape[1]
        end = start_pos + seqlen
        h = self.embed(tokens)
        rope = self.rope[start_pos:end]
        mask = None
        if seqlen > 1:  # query i (position start_pos + i) sees keys t <= start_pos + i
            mask = torch.full((seqlen, end), float("-inf"), device=tokens.device).triu_(start_pos + 1)
        for layer in self.layers:
            h = layer(h, start_pos, rope, mask)
        logits = self.head(self.norm(h)[:, -1]).float()
        return self.tp.all_gather_last(logits)


@torch.no_grad()
def init_random(model: Transformer, seed: int) -> Transformer:
    """Deterministic random weights (no checkpoint): Linear and gate weights ~ N(0, 1/in_features), embedding
    ~ N(0, 1), norm weights 1 + N(0, 0.1^2), gate bias ~ N(0, 0.1^2); FP8 weights get real block scales via
    quantize_weight. Values depend on the local shapes, so at world size > 1 shard a world-size-1 init instead.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"init_random needs a Transformer, got {type(model).__name__}")
    gen = torch.Generator().manual_seed(int(seed))

    def normal(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    for name, module in model.named_modules():
        if isinstance(module, Linear):
            w = normal(module.weight.shape, module.weight.shape[1] ** -0.5)
            if module.scale is None:
                module.weight.copy_(w)
            else:
                q, s = quantize_weight(w, model.args.scale_fmt)
                module.weight.copy_(q)
                module.scale.copy_(s)
        elif isinstance(module, Gate):
            module.weight.copy_(normal(module.weight.shape, module.weight.shape[1] ** -0.5))
            if module.bias is not None:
                module.bias.copy_(normal(module.bias.shape, 0.1))
        elif isinstance(module, ParallelEmbedding):
            module.weight.copy_(normal(module.weight.shape, 1.0))
        elif isinstance(module, RMSNorm):
            module.weight.copy_(1 + normal(module.weight.shape, 0.1))
    return model


def kv_cache_bytes_per_token(args: ModelArgs, attn_impl: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """KV-cache bytes one token occupies across all layers (all heads, world size 1).

    absorb: n_layers * (kv_lora_rank + qk_rope_head_dim); naive: n_layers * n_heads * (qk_head_dim + v_head_dim);
    times the element size of `dtype`.
    """
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    if attn_impl == "absorb":
        per_layer = args.kv_lora_rank + args.qk_rope_head_dim
    else:
        per_layer = args.n_heads * (args.qk_head_dim + args.v_head_dim)
    return args.n_layers * per_layer * torch.empty((), dtype=dtype).element_size()
