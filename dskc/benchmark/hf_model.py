"""Model suite, the drop-in door: transformers' own DeepSeek-V3 (random weights, bf16) through
`torch.compile(model, backend="dskc")` next to `backend="inductor"` and eager, prefill and decode tokens/s.

GPU: one DeepSeek-V3 layer at full width (MLA, 256 routed experts of which 8 per token, a shared expert; vocab 129280
included), prefill of 1024 tokens at batch 1 / 8 and a decode step at batch 1 / 8 / 64 over a 1024-token cache.
Decode is one step after the prompt, with transformers' DynamicCache cropped back to the prompt after each step
(so every timed step sees the same context). CPU smoke: a tiny 1-layer model (hidden 128), prefill only, through
the interpreter with the rest on aot_eager: it shows the path runs and matches eager float32, nothing more.
Skipped (with the reason) where transformers is not installed.
"""
from __future__ import annotations

import torch

from dskc.benchmark.cases import Case, Impl
from dskc.benchmark.common import Ctx, have

V3_LAYER = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                num_hidden_layers=1, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
                n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
                qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
                num_experts_per_tok=8, first_k_dense_replace=0, max_position_embeddings=4096)
CHUNK = 256
TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=8,
            routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=128, qk_rope_head_dim=64, v_head_dim=32,
            qk_nope_head_dim=32, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=0,
            max_position_embeddings=256)


def _build(ctx: Ctx, cfg: dict):
    """{"torch-bf16": eager, "dskc-backend": backend="dskc", "torch-compile": backend="inductor"} on one model,
    each built on first use (the compiled ones wrap the same weights)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    held = {}

    def get(impl):
        if impl not in held:
            if impl == "torch-bf16":
                torch.manual_seed(0)
                with torch.device(ctx.device):
                    held[impl] = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).to(torch.bfloat16).eval()
            elif impl == "torch-fp32":
                held[impl] = _fp32(get("torch-bf16"))
            else:
                torch._dynamo.reset()
                backend = "dskc" if impl == "dskc-backend" else "inductor"
                options = {"rest": "aot_eager"} if backend == "dskc" and ctx.smoke else None
                held[impl] = torch.compile(get("torch-bf16"), backend=backend, options=options, dynamic=True)
        return held[impl]
    return get


def _fp32(model):
    import copy
    return copy.deepcopy(model).float()


def _run(ctx: Ctx, get, impl: str, tok: torch.Tensor, prompt: int, decode: bool):
    def make():
        model = get(impl)
        if not decode:
            return torch.no_grad()(lambda: model(tok[:, :prompt], use_cache=False).logits)
        from transformers import DynamicCache
        cache = DynamicCache()
        with torch.no_grad():   # the cache filled by eager in chunks (V3's eager scores at batch 64 x 1024^2 x 128
            for start in range(0, prompt, CHUNK):   # heads would take 34 GB at once)
                get("torch-bf16")(tok[:, start:min(start + CHUNK, prompt)], cache=cache, use_cache=True)

        @torch.no_grad()
        def step():
            logits = model(tok[:, prompt:], cache=cache, use_cache=True).logits
            cache.crop(prompt)
            return logits
        return step
    return make


def _impls(ctx: Ctx, get, tok, prompt: int, decode: bool) -> tuple:
    run = lambda impl: _run(ctx, get, impl, tok, prompt, decode)   # noqa: E731
    impls = [Impl("dskc-backend", run("dskc-backend"),
                  note="rest on aot_eager, interpreted kernels (smoke)" if ctx.smoke else "rest on Inductor"),
             Impl("torch-bf16", run("torch-bf16"), note="eager transformers DeepseekV3ForCausalLM")]
    if ctx.smoke or not ctx.compile_mode:
        impls.append(Impl("torch-compile", skip=ctx.compile_skip or "backend='inductor' runs in the GPU suite only"))
    else:
        impls.append(Impl("torch-compile", run("torch-compile"), note="torch.compile(model, backend='inductor')"))
    return tuple(impls)


def _case(ctx: Ctx, label: str, get, batch: int, prompt: int, decode: bool) -> Case:
    phase = "decode" if decode else "prefill"
    gen = torch.Generator().manual_seed(batch * 1000 + prompt)
    tok = torch.randint(0, 256, (batch, prompt + 1), generator=gen).to(ctx.device)
    ref = None
    if ctx.smoke and not decode:
        ref = lambda: torch.no_grad()(get("torch-fp32"))(tok[:, :prompt], use_cache=False).logits   # noqa: E731
    return Case("model", f"{label} {phase} batch={batch} context={prompt}", "model",
                {"model": label, "phase": phase, "batch": batch, "context": prompt},
                _impls(ctx, get, tok, prompt, decode), primary="tokens_per_s",
                tokens=batch if decode else batch * prompt, ref=ref)


def cases(ctx: Ctx):
    label = "transformers deepseek-v3 " + ("tiny(1 layer)" if ctx.smoke else "1 layer")
    if not have("transformers"):
        skip = "transformers is not installed (pip install 'dskc[test]')"
        yield Case("model", f"{label} prefill", "model", {"model": label, "phase": "prefill"},
                   (Impl("dskc-backend", skip=skip),), primary="tokens_per_s")
        return
    get = _build(ctx, TINY if ctx.smoke else V3_LAYER)
    if ctx.smoke:
        yield _case(ctx, label, get, 1, 4, False)
        return
    for batch in (1, 8):
        yield _case(ctx, label, get, batch, 1024, False)
    for batch in (1, 8, 64):
        yield _case(ctx, label, get, batch, 1024, True)
