"""Model suite: prefill and decode tokens/s of deepseek-v2-lite (random weights) and of one deepseek-v3 MoE layer
(embedding and head included), dskc.compiler.compile vs eager vs torch.compile; transformers' DeepSeek-V3 through
torch.compile(backend="dskc") vs backend="inductor" (dskc.benchmark.hf_model); KV-cache bytes per token; beside
each dskc and eager row, the kernels one step launches (dskc.runtime.counter).

Decode is timed as one step at a fixed position (the cache already holds the prompt), repeated: tokens/s =
batch / step time. Prefill: tokens/s = batch x prompt / time of the prompt's forward.
"""
from __future__ import annotations

import torch

from dskc.benchmark import hf_model
from dskc.benchmark.cases import Case, Impl
from dskc.benchmark.common import Ctx

MODEL_COMPILE_MODE = "default"   # max-autotune on a whole model takes far longer than a GPU check may run
PREFILL_CHUNK = 256              # decode cases fill the cache in chunks: V3's eager scores at batch 64 x 1024 x
                                 # 128 heads x 1024 keys would take 34 GB at once


@torch.no_grad()
def init_fast(model, seed: int = 0):
    """Random weights generated on the model's device (dskc.model.init_random's scales, without its CPU generator,
    which would take minutes for 16B parameters): matrices ~ N(0, 1/in), FP8 matrices e4m3 of N(0, 1) with block
    scales 1/sqrt(in), norms 1 + N(0, 0.01), the gate bias N(0, 0.01), the embedding N(0, 1)."""
    gen = torch.Generator(device=model.rope.device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dtype == torch.float8_e4m3fn:
            p.copy_(torch.randn(p.shape, device=p.device, generator=gen).to(p.dtype))
        elif leaf == "scale":
            p.fill_((128.0 * p.shape[-1]) ** -0.5)
        elif "embed" in name:
            p.normal_(0, 1, generator=gen)
        elif p.dim() >= 2:
            p.normal_(0, p.shape[-1] ** -0.5, generator=gen)
        else:
            p.normal_(1.0 if "norm" in name else 0.0, 0.1, generator=gen)
    return model


def _build(ctx: Ctx, name: str, overrides: dict):
    """{"torch-bf16": eager, "torch-compile": torch.compile of it, "dskc": dskc.compiler.compile of a copy}, each
    built on first use."""
    from dskc.model import Transformer, get_config, init_random

    cfg = get_config(name, **overrides)
    held = {}

    def get(impl):
        if impl not in held:
            if impl == "torch-bf16":
                model = Transformer(cfg, device=ctx.device)
                held[impl] = init_random(model, 0) if ctx.smoke else init_fast(model)
            elif impl == "torch-compile":
                held[impl] = torch.compile(get("torch-bf16"), mode=MODEL_COMPILE_MODE)
            else:
                from dskc import compiler
                held[impl] = compiler.compile(get("torch-bf16"), "sm90a" if ctx.smoke else "auto", progress=False)
        return held[impl]
    return cfg, get


def _counter(get, impl: str, tok, prompt: int, decode: bool):
    """() -> kernels per step of `impl` (dskc.runtime.counter): dskc's decode step as its CUDA graph replays it,
    else the model's forward at this case's tokens."""
    def count():
        from dskc.runtime import counter
        model = get(impl)
        if decode and impl == "dskc":
            return counter.count_decode(model, tok.shape[0], prompt).total()["total"]
        return counter.count_forward(model, tok[:, prompt:] if decode else tok[:, :prompt],
                                     prompt if decode else 0).total()["total"]
    return count


def _impls(ctx: Ctx, get, tok, prompt: int, decode: bool):
    def make(impl):
        def ready():
            if impl == "torch-compile":  # fresh caches per case: the recompile limit (8) would turn it eager
                torch._dynamo.reset()
            model = get(impl)
            if not decode:
                return lambda: model(tok[:, :prompt], 0)
            if not ctx.smoke:  # the smoke run skips filling the cache (one interpreted prefill costs seconds)
                for start in range(0, prompt, PREFILL_CHUNK):   # chunks bound the eager attention scores' memory
                    model(tok[:, start:min(start + PREFILL_CHUNK, prompt)], start)
            return lambda: model(tok[:, prompt:], prompt)
        return ready
    impls = [Impl("dskc", make("dskc"), note="interpreted kernels (smoke)" if ctx.smoke else "",
                  count=_counter(get, "dskc", tok, prompt, decode)),
             Impl("torch-bf16", make("torch-bf16"), note="eager PyTorch, the dskc.model reference code",
                  count=_counter(get, "torch-bf16", tok, prompt, decode))]
    if ctx.smoke:
        impls.append(Impl("torch-compile", skip=ctx.compile_skip or "torch.compile runs in the GPU suites only"))
    elif ctx.compile_mode:
        impls.append(Impl("torch-compile", make("torch-compile"), note=f"mode={MODEL_COMPILE_MODE}"))
    else:
        impls.append(Impl("torch-compile", skip=ctx.compile_skip))
    return tuple(impls)


def _case(ctx, label, get, batch, prompt, decode) -> Case:
    """One phase at one batch size; the smoke prefill compares dskc's logits with eager's (same tokens)."""
    phase = "decode" if decode else "prefill"
    gen = torch.Generator().manual_seed(batch * 1000 + prompt)
    tok = torch.randint(0, 1000, (batch, prompt + 1), generator=gen).to(ctx.device)
    ref = (lambda: get("torch-bf16")(tok[:, :prompt], 0)) if ctx.smoke and not decode else None
    return Case("model", f"{label} {phase} batch={batch} context={prompt}", "model",
                {"model": label, "phase": phase, "batch": batch, "context": prompt},
                _impls(ctx, get, tok, prompt, decode), primary="tokens_per_s",
                tokens=batch if decode else batch * prompt, ref=ref)


def cases(ctx: Ctx):
    if ctx.smoke:
        label, overrides = "tiny(1 layer)", dict(n_layers=1, max_batch_size=2, max_seq_len=64)
        _, get = _build(ctx, "tiny", overrides)
        yield _case(ctx, label, get, 1, 4, False)
        yield _case(ctx, label, get, 2, 4, True)
        yield from hf_model.cases(ctx)
        return
    for label, name, overrides in (
            ("deepseek-v2-lite", "deepseek-v2-lite", dict(max_batch_size=64, max_seq_len=2048)),
            ("deepseek-v3 1 layer", "deepseek-v3", dict(n_layers=1, n_dense_layers=0, max_batch_size=64,
                                                         max_seq_len=2048))):
        _, get = _build(ctx, name, overrides)
        for batch in (1, 8):
            yield _case(ctx, label, get, batch, 1024, False)
        for batch in (1, 8, 64):
            yield _case(ctx, label, get, batch, 1024, True)
    yield from hf_model.cases(ctx)


def kv_cache_rows() -> list[dict]:
    """KV-cache bytes per token (all layers) of every named config: naive and absorbed bf16, absorbed FP8
    (FlashMLA's 656-byte token format)."""
    from dskc.model import CONFIGS, kv_cache_bytes_per_token
    from dskc.ops.mla import FP8_TOKEN_BYTES

    rows = []
    for name, cfg in sorted(CONFIGS.items()):
        for impl in ("naive", "absorb"):
            rows.append({"model": name, "attn_impl": impl, "dtype": "bf16",
                         "bytes_per_token": kv_cache_bytes_per_token(cfg, impl)})
        rows.append({"model": name, "attn_impl": "absorb", "dtype": "fp8 (656 B/layer)",
                     "bytes_per_token": cfg.n_layers * FP8_TOKEN_BYTES})
    return rows
