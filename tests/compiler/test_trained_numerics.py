"""The numerics criteria the compiler is held to, on the trained tiny-text model (dskc.model.train; its committed
FP8 checkpoint), through the generated kernels (the Triton interpreter on a CPU).

Per region, on identical inputs: every lowered region is fed the activations eager PyTorch produced at its input
(forward hooks on the eager model) and its output compared with eager's, the eager model using the same FP8
recipe (Transformer(..., gemm_impl="fp8"): e4m3 weights with 128x128 block scales, activations rounded through
1x128 e4m3 before each FP8 GEMM). FP8 linears, the dense MLP, MoE and MLA (GEMM-class): relative error
(Frobenius) within 2e-2; a fused block (two of those in a row) within 3e-2. The attention core (eager's query and
latent kv in, wo's input out): within 5e-3 of the same attention in float64, and no farther from it than eager bf16.
End to end: compiled FP8 vs eager with the same recipe over 4 prompts x 32 new tokens, prefill last-position
logits within 3e-2 and the same greedy token at >= 90 % of the positions (fed eager's continuation); without FP8
(the same weights as bf16, fp16 compute as the interpreter runs dot operands), compiled vs eager float64: the same
greedy tokens and logits within 5e-3.
The figures measured on this machine are in each test's docstring and in its assertion message.
"""
import dataclasses

import pytest
import torch

from dskc import compiler
from dskc.ir.graph import Op
from dskc.model import Transformer
from dskc.model.mla import apply_rope
from dskc.model.train import encode, load_trained

PROMPTS = ('The "while" statement is', "Exceptions are raised by", "A function definition is",
           "A class definition is an")   # 24 bytes each: generate's first call is the prefill of all four
NEW_TOKENS = 32
REGION_OPS = (Op.LINEAR, Op.FP8_LINEAR, Op.MLP, Op.MOE, Op.MLA, Op.BLOCK)


def _rel(x, ref) -> float:
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm()).item()


def _tokens() -> torch.Tensor:
    toks = [encode(p) for p in PROMPTS]
    assert len({len(t) for t in toks}) == 1
    return torch.tensor(toks)


@pytest.fixture(scope="module")
def fp8_models():
    eager = load_trained(gemm_impl="fp8")
    compiled = compiler.compile(load_trained(gemm_impl="fp8"), "sm90a", build_kernels=False, progress=False)
    assert compiled.plan.fallbacks == []
    return eager, compiled


class _Recorder:
    """Forward hooks on eager modules: the positional inputs and the output of each module's first call."""

    def __init__(self, model, names, input_of=()):
        self.seen, self.handles = {}, []
        for name in names:
            self.handles.append(model.get_submodule(name).register_forward_hook(self._keep(name)))
        for name in input_of:   # only the input (wo's input is the attention core's output)
            self.handles.append(model.get_submodule(name).register_forward_pre_hook(self._keep_input(name)))

    def _keep(self, name):
        def hook(module, args, out):
            self.seen.setdefault(name, (tuple(a.clone() if torch.is_tensor(a) else a for a in args), out.clone()))
        return hook

    def _keep_input(self, name):
        def hook(module, args):
            self.seen.setdefault(name + ":in", args[0].clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def region_errors(fp8_models):
    """{region: relative error of the compiled region fed eager's inputs}, and per layer the attention core's
    errors: {"compiled_vs_eager", "compiled_vs_float64", "eager_vs_float64"}."""
    eager, compiled = fp8_models
    names = [n.name for n in compiled.plan.graph.nodes if n.op in REGION_OPS and not n.attr("absorbed_into")]
    # a region that applies its input's RMSNorm itself (fuse_head_norm: the head) is fed that norm's input
    norm_of = {n.name: n.attr("norm") for n in compiled.plan.graph.nodes if n.name in names and n.attr("norm")}
    layers = [f"layers.{i}.attn" for i in range(eager.args.n_layers)]
    projections = [f"{a}.{p}" for a in layers for p in ("wq_a", "wq_b", "wkv_a")]
    rec = _Recorder(eager, names + list(norm_of.values()) + projections, input_of=[f"{a}.wo" for a in layers])
    exact = load_trained(gemm_impl="fp8", dtype=torch.float64)
    with torch.inference_mode():
        eager(_tokens(), 0)
        rec.remove()
        errors = {}
        for name in names:
            args, out = rec.seen[name]
            if name in norm_of:      # the model takes the last position after its norm (model.forward)
                args = (rec.seen[norm_of[name]][0][0][:, -1],)
            errors[name] = _rel(compiled.module.get_submodule(name)(*args), out)
        core = {}
        for a in layers:
            c, e = _attention_core(compiled.module.get_submodule(a), rec.seen, a), rec.seen[f"{a}.wo:in"]
            r = _exact_core(exact.get_submodule(a), rec.seen, a)
            core[a] = {"compiled_vs_eager": _rel(c, e), "compiled_vs_float64": _rel(c, r),
                       "eager_vs_float64": _rel(e, r)}
    return names, errors, core


def _exact_core(att, seen, a):
    """The attention core of the float64 eager model (absorbed form) on eager's bf16 query and latent kv."""
    (_, start_pos, rope, mask), _ = seen[a]
    q = seen[f"{a}.wq_b"][1].double()
    q = q.view(*q.shape[:2], att.n_local_heads, att.nope + att.rope)
    q_nope, q_pe = q.split([att.nope, att.rope], dim=-1)
    kv, k_pe = seen[f"{a}.wkv_a"][1].double().split([att.kv_lora_rank, att.rope], dim=-1)
    k_pe = apply_rope(k_pe.unsqueeze(2), rope)
    return att._absorb(q_nope, apply_rope(q_pe, rope), kv, k_pe, start_pos, mask).flatten(2)


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def _attention_core(kmla, seen, a):
    """The compiled MLA between its GEMMs: eager's wq_b output (the query) and wkv_a output (latent kv + rope key)
    in; the tensor handed to wo out (the latent cache write with RMSNorm + RoPE, absorbed q, mla_decode, w_uv)."""
    wo = kmla.wo
    kmla._query = lambda qa: seen[f"{a}.wq_b"][1]     # the instance attribute shadows the method
    kmla.wo = _Identity()
    try:
        (x, start_pos, rope, mask), _ = seen[a]
        return kmla.attend_projected(seen[f"{a}.wq_a"][1], seen[f"{a}.wkv_a"][1], start_pos, rope)
    finally:
        del kmla._query
        kmla.wo = wo


def test_every_region_fed_eager_inputs_within_2e2_of_eager_fp8(fp8_models, region_errors):
    """FP8 linears, the dense MLP, the MoE layers and MLA (its FP8 projections included) within 2e-2, each fed the
    activations eager produced at its input; a fused block (MLA, then the ffn fed MLA's result: two GEMM-class
    regions in a row) within the end-to-end bound, 3e-2. Measured here (CPU, interpreter): FP8 linears
    3.9e-3 - 4.4e-3 (eager's bf16 rounding of the dequantised weights and activations), head (bf16, with the final
    norm fused in, fp32 logits against eager's bf16 ones) 1.5e-3, MLA 9.9e-3 / 1.2e-2 / 1.3e-2, dense MLP 7.7e-3
    (its SwiGLU works on the fp32 accumulators, eager's on bf16 roundings: 1.1e-2 before the lean step), MoE
    1.1e-2 / 1.1e-2, blocks 8.6e-3 / 1.3e-2 / 1.9e-2 (no token's expert set differs there; the MLA and ffn errors
    add up)."""
    names, errors, _ = region_errors
    ops = {n.name: n.op for n in fp8_models[1].plan.graph.nodes}
    assert {ops[n] for n in names} == set(REGION_OPS)   # every kind of region, the bf16 head included
    msg = "relative error per region: " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items())
    print(msg)
    assert all(e < 2e-2 for n, e in errors.items() if ops[n] is not Op.BLOCK), msg
    assert all(e < 3e-2 for n, e in errors.items() if ops[n] is Op.BLOCK), msg


def test_attention_core_on_eager_inputs_within_5e3_of_float64_and_no_worse_than_eager_bf16(region_errors):
    """The MLA attention between its GEMMs (cache write with RMSNorm + RoPE, mla_decode, the absorbed w_uk / w_uv),
    fed eager's query and latent kv, against the same attention in float64 on those inputs. Measured here (CPU,
    interpreter: fp16 cache): compiled 2.3e-3 / 1.9e-3 / 1.9e-3 from float64 in layers 0 / 1 / 2, eager bf16
    3.8e-3 / 5.5e-3 / 4.1e-3; compiled vs eager bf16 3.7e-3 / 5.5e-3 / 4.3e-3, which is eager's own rounding (a
    bound of 5e-3 against eager bf16 would fail in layer 1 for any implementation that is not eager itself)."""
    *_, core = region_errors
    msg = "; ".join(f"{n}: " + ", ".join(f"{k} {v:.2e}" for k, v in e.items()) for n, e in core.items())
    print(msg)
    assert all(e["compiled_vs_float64"] < 5e-3 for e in core.values()), msg
    assert all(e["compiled_vs_float64"] <= e["eager_vs_float64"] for e in core.values()), msg


def _teacher_forced(model, prompts: torch.Tensor, forced: torch.Tensor):
    """Prefill of the prompts, then one decode step per forced token (through the KV cache, as generate() does):
    returns the prefill logits and the greedy token of every call [bsz, 1 + forced tokens - 1]."""
    with torch.inference_mode():
        logits = model(prompts, 0)
        first, picks, pos = logits, [logits.argmax(-1)], prompts.shape[1]
        for j in range(forced.shape[1] - 1):
            logits = model(forced[:, j:j + 1].clone(), pos)
            picks.append(logits.argmax(-1))
            pos += 1
    return first, torch.stack(picks, dim=1)


def test_fp8_end_to_end_prefill_logits_within_3e2_and_90pct_greedy_tokens(fp8_models):
    """Compiled FP8 vs eager with the same FP8 recipe over 4 prompts x 32 new tokens: last-position prefill logits
    within 3e-2, and the compiled model's greedy token the same as eager's at >= 90 % of the positions, both fed
    eager's greedy continuation (so that one near-tie does not decide the rest of a sequence). Measured here:
    prefill logits 2.18e-2, greedy tokens identical at 123/128 (before the lean decode step 1.37e-2, 126/128: the
    fused kernels skip some of eager's bf16 roundings and the head writes fp32 logits, so the compiled model moved
    away from eager bf16 and towards the truth: against eager float64 of the same recipe it is 1.26e-2 off, was
    1.43e-2, where eager bf16 is 2.22e-2 off). Free-running (each model following its own
    choices) the two agree at 101/128 positions: 3 of the 128 choices are near-ties, within one bf16 step of the
    logits (eager bf16's top two logits are exactly equal at two of them), and eager bf16 agrees with eager
    float64 of the same recipe at only 80/128 positions that way."""
    eager, compiled = fp8_models
    prompts = _tokens()
    ref_first, ref = _free_running(eager, prompts)
    first, picks = _teacher_forced(compiled.module, prompts, ref)
    err = _rel(first, ref_first)
    same, total = int((picks == ref).sum()), ref.numel()
    msg = f"prefill logits relative error {err:.3e}; greedy tokens identical at {same}/{total}"
    print(msg)
    assert total == len(PROMPTS) * NEW_TOKENS
    assert err < 3e-2, msg
    assert same >= 0.9 * total, msg


def _free_running(model, prompts: torch.Tensor):
    """Prefill logits and the greedy continuation [bsz, NEW_TOKENS] of the model's own choices."""
    with torch.inference_mode():
        logits = model(prompts, 0)
        first, tok, out, pos = logits, logits.argmax(-1, keepdim=True), [], prompts.shape[1]
        for _ in range(NEW_TOKENS):
            out.append(tok)
            if len(out) == NEW_TOKENS:
                break
            tok = model(tok, pos).argmax(-1, keepdim=True)
            pos += 1
    return first, torch.cat(out, dim=1)


def test_without_fp8_same_greedy_tokens_and_logits_within_5e3_of_float64():
    """The trained weights as bf16 (dequantised from the checkpoint), fp16 compute; compiled vs eager float64 over
    a prefill of 4 prompts and 16 decode steps fed the reference's greedy tokens: every step's logits within 5e-3
    and the same greedy token. Measured here: compiled within 3.5e-4 of float64 (eager fp16 1.1e-3), the same
    greedy tokens at all 17 calls x 4 prompts."""
    fp8 = load_trained()
    cfg = dataclasses.replace(fp8.args, dtype="bf16")
    dense = {k: v for k, v in fp8.state_dict().items() if not k.endswith(".scale")}
    for name, mod in fp8.named_modules():
        if getattr(mod, "scale", None) is not None:
            dense[f"{name}.weight"] = mod.dense_weight()
    ref, half = Transformer(cfg, dtype=torch.float64), Transformer(cfg, dtype=torch.float16)
    ref.load_state_dict(dense)
    half.load_state_dict(dense)
    compiled = compiler.compile(half, "sm90a", build_kernels=False, progress=False)
    assert compiled.plan.fallbacks == []
    tok, pos, errs, agree = _tokens(), 0, [], []
    with torch.inference_mode():
        for _ in range(17):
            r, c = ref(tok, pos), compiled(tok.clone(), pos)
            errs.append(_rel(c, r))
            agree.append(bool((c.argmax(-1) == r.argmax(-1)).all()))
            pos += tok.shape[1]
            tok = r.argmax(-1, keepdim=True)
    msg = f"max relative error {max(errs):.2e} over 17 calls; greedy tokens equal at {sum(agree)}/17 steps"
    print(msg)
    assert max(errs) < 5e-3, msg
    assert all(agree), msg
