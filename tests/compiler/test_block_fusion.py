"""fuse_block_norms: a block's attn_norm / ffn_norm (+ residual add) fused into the FP8 activation quantisation.

The plan tests need no kernels (models on the meta device). The numerics compare one KernelBlock against the eager
block in float64 with the same FP8 recipe (1x128 e4m3 activations before every FP8 linear). That quantisation is
discontinuous: any rounding difference before it (bf16 vs float64 activations) flips some e4m3 values by one ulp
(1/16 relative), so a single block lands a few percent from float64 whatever runs it. Measured on the CPU
(interpreter), tiny FP8, seeds 0-4 and 10-15, relative error of the block's update (output - x) vs float64:
- dense block: fused 4.5-7.0 %; eager bf16 3.1-7.1 %;
- MoE block: fused 4.9-7.3 %, 12.5-20.9 % on prefills where a routing choice flips (eager bf16 5.2-19.5 %, on
  other inputs: it rounds differently, so it flips elsewhere);
- the unfused KernelMLA + KernelMLP path: the same numbers, bit for bit (on the CPU both round the normed x once
  to bf16 before quantising it; the whole tiny model's logits are bit-identical too).
The fused block must do no worse than the unfused one; the bounds below hold the measured maxima with margin.
"""
import pytest
import torch

from dskc import compiler, knobs
from dskc.explain import kernel_table
from dskc.ir.graph import Graph, Node, Op, VerifyError, verify
from dskc.lower.passes import Options
from dskc.model import Transformer, get_config, init_random

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not (torch.cuda.is_available() or knobs.get().triton_interpret),
                                   reason="needs a CUDA GPU or TRITON_INTERPRET=1")
TINY_Q_A, TINY_KV_A = 128, 512 + 64        # tiny's wq_a and wkv_a widths (q_lora_rank, kv_lora_rank + rope)
# per layer of tiny (0: dense MLP, 1: MoE), on the block's update: the largest relative error from float64 and the
# smallest cosine similarity allowed. Measured (module doc): dense <= 7.0 %, MoE <= 20.9 % (a routing flip).
MAX_REL, MIN_COS = {0: 0.1, 1: 0.3}, {0: 0.99, 1: 0.95}
# "no worse than the unfused path", with room for e4m3 flips: on the CPU the two are bit-identical; on a GPU
# torch's rms_norm may round the normed x differently from the fused kernel, which moves each error by a few %
NO_WORSE = 1.25


def _nodes(p):
    return {n.name: n for n in p.graph.nodes}


def test_pass_fuses_attn_norm_into_one_stacked_gemm_and_ffn_norm_into_the_dense_mlp():
    cfg = get_config("tiny")
    p = compiler.plan(Transformer(cfg, device="meta"), "sm90a", m_hint=64)
    nodes = _nodes(p)
    assert p.fallbacks == []
    for i in range(cfg.n_layers):
        b = nodes[f"layers.{i}"]
        assert b.op is Op.BLOCK and b.attr("attn_norm") == "rmsnorm_act_quant"
        assert b.attr("attn_gemm_n") == (TINY_Q_A + TINY_KV_A,) and b.attr("attn_inputs") == "wq_a+wkv_a"
        assert nodes[f"layers.{i}.attn_norm"].attr("fused_into") == f"layers.{i}"
        for lin in ("wq_a", "wkv_a"):
            assert nodes[f"layers.{i}.attn.{lin}"].attr("fused_into") == f"layers.{i}"
            assert not [c for c in p.choices if c.region == f"layers.{i}.attn.{lin}"]
        # the block lists what it runs: the rmsnorm + act_quant kernel and one GEMM over [wq_a; wkv_a]
        kernels = [(c.slot, c.stem, dict(c.problem)) for c in p.choices if c.region == f"layers.{i}" and c.tokens == 64]
        assert kernels == [("quant", "act_quant", {"M": 64, "K": cfg.dim, "dtype": "bf16", "op": "rmsnorm",
                                                   "ue8m0": 0, "y_dtype": ""}),
                           ("gemm0", "fp8_gemm_1d2d", {"M": 64, "N": TINY_Q_A + TINY_KV_A, "K": cfg.dim,
                                                       "out_dtype": "bf16", "residual": 0})]
    dense = cfg.n_dense_layers
    assert nodes["layers.0.ffn_norm"].attr("fused_into") == "layers.0.ffn"
    assert nodes["layers.0.ffn_norm"].attr("residual") == "add"
    assert nodes["layers.0.ffn"].attr("prologue") == "add_rmsnorm_act_quant"
    assert nodes["layers.0.ffn"].attr("residual") == "down"             # the block's 2nd add: in w2's epilogue
    assert nodes["layers.0"].attr("ffn_norm") == "add_rmsnorm_act_quant"
    for i in range(dense, cfg.n_layers):          # MoE: the same kernel also writes the normed x for the gate
        assert nodes[f"layers.{i}.ffn"].op is Op.MOE
        assert nodes[f"layers.{i}"].attr("ffn_norm") == "add_rmsnorm_act_quant_normed"
        assert nodes[f"layers.{i}.ffn_norm"].attr("fused_into") == f"layers.{i}.ffn"
        assert nodes[f"layers.{i}.ffn"].attr("residual") == "combine"   # ... and in the MoE's combine
        moe = [(c.slot, dict(c.problem)["op"]) for c in p.choices if c.region == f"layers.{i}.ffn" and c.tokens == 64
               and c.stem == "act_quant"]
        assert moe == [("quant", "add_rmsnorm_normed")]
    table = kernel_table(p)
    assert f"layers.*.attn_norm -> layers.* ({cfg.n_layers})" in table
    assert f"layers.*.ffn_norm -> layers.*.ffn ({cfg.n_layers})" in table
    assert "norm -> head (1)" in table and "eager PyTorch" not in table      # fuse_head_norm: none left eager


def test_q_lora_rank_0_stacks_wq_with_wkv_a_or_keeps_two_gemms_when_blocks_do_not_align():
    # deepseek-v2-lite ships bf16 weights; quantize_weights makes its linears FP8 (its dense MLP stays bf16: 10944
    # is not whole 128-blocks)
    lite = _nodes(compiler.plan(Transformer(get_config("deepseek-v2-lite"), device="meta"), "sm90a",
                                Options(quantize_weights=True)))
    assert lite["layers.0"].attr("attn_inputs") == "wq+wkv_a"
    assert lite["layers.0"].attr("attn_gemm_n") == (16 * 192 + 576,)
    assert lite["layers.0.ffn"].dtype == "bf16" and lite["layers.0"].attr("ffn_norm") is None
    # 3 heads x 192: wq is 576 wide, its last scale block would straddle wq and wkv_a: two GEMMs on one (q, s)
    p = compiler.plan(Transformer(_split_cfg(), device="meta"), "sm90a", m_hint=64)
    assert _nodes(p)["layers.0"].attr("attn_gemm_n") == (576, 576)
    assert [dict(c.problem).get("N") for c in p.choices if c.region == "layers.0" and c.tokens == 64] == \
        [None, 576, 576]


def _split_cfg():
    return get_config("tiny", q_lora_rank=0, n_heads=3, qk_nope_head_dim=128, v_head_dim=128, n_layers=1)


def test_non_fp8_models_and_the_option_off_change_nothing():
    bf16 = Transformer(get_config("tiny", dtype="bf16"), device="meta")
    on, off = compiler.plan(bf16, "sm90a"), compiler.plan(bf16, "sm90a", Options(fuse_block_norms=False))
    assert on.graph == off.graph and on.choices == off.choices
    unfused = lambda n: not (n.attr("attn_norm") or n.attr("ffn_norm") or n.attr("attn_gemm_n"))  # noqa: E731
    assert all(unfused(n) for n in on.graph.by_op(Op.BLOCK))
    assert not any(n.attr("fused_into") for n in on.graph.nodes if n.name.endswith(("attn_norm", "ffn_norm")))
    fp8 = compiler.plan(Transformer(get_config("tiny"), device="meta"), "sm90a", Options(fuse_block_norms=False))
    assert all(unfused(n) for n in fp8.graph.by_op(Op.BLOCK))


def test_verifier_checks_fusion_targets_and_block_parts():
    with pytest.raises(VerifyError, match="names no node"):
        verify(Graph((Node("n", Op.RMSNORM, (8,), "bf16", (("fused_into", "nowhere"),)),)))
    with pytest.raises(VerifyError, match="missing"):
        verify(Graph((Node("b", Op.BLOCK, ("T", 8), "bf16"), Node("b.attn_norm", Op.RMSNORM, (8,), "bf16"))))


# ---- numerics --------------------------------------------------------------------------------------------------

def _rel(x, ref):
    return ((x.double().cpu() - ref).norm() / ref.norm()).item()


def _models(cfg, seed=0):
    """(eager bf16, float64 reference, fused compiled module, unfused compiled module), same weights."""
    eager = Transformer(cfg, gemm_impl="fp8", device=DEV)
    init_random(eager, seed=seed)
    ref = Transformer(cfg, dtype=torch.float64, gemm_impl="fp8")
    ref.load_state_dict({k: v.cpu() for k, v in eager.state_dict().items()})
    fused = compiler.compile(eager, "sm90a" if DEV == "cpu" else "auto", build_kernels=False, progress=False)
    unfused = compiler.compile(eager, "sm90a" if DEV == "cpu" else "auto", build_kernels=False, progress=False,
                               options=Options(fuse_block_norms=False))
    assert fused.plan.fallbacks == [] and unfused.plan.fallbacks == []
    return eager, ref, fused.module, unfused.module


@pytest.fixture(scope="module")
def tiny():
    return _models(get_config("tiny", dtype="fp8"))


def _poison_caches(*modules):
    """NaN in every KV-cache slot, so a read of a slot the call did not write shows."""
    for m in modules:
        for mod in m.modules():
            if type(mod).__name__ == "KernelMLA":
                mod.cache.fill_(float("nan"))


def _run_block(models, layer, seed):
    """Prefill 7 tokens then decode 1, batch 2, fresh random inputs: per call (fused, unfused, eager) errors of
    the block's update (output - x) against the float64 block."""
    from dskc.runtime.block import KernelBlock
    eager, ref, fused, unfused = models
    assert isinstance(fused.layers[layer], KernelBlock) and not isinstance(unfused.layers[layer], KernelBlock)
    block = fused.layers[layer]
    if block.w_in is not None:    # the projections' weights are views into the stacked weight, held once
        first, wkv_a = block.attn.input_projections()
        assert first.weight.data_ptr() == block.w_in.data_ptr() and wkv_a.scale.data_ptr() > block.s_in.data_ptr()
    _poison_caches(fused, unfused)
    gen, pos, errs = torch.Generator().manual_seed(seed), 0, []
    for bsz, seqlen in ((2, 7), (2, 1)):
        x = torch.randn(bsz, seqlen, ref.args.dim, generator=gen).to(torch.bfloat16)
        mask = None if seqlen == 1 else torch.full((seqlen, pos + seqlen), float("-inf")).triu_(pos + 1)
        rope = ref.rope[pos:pos + seqlen]
        xd, md, rd = x.to(DEV), None if mask is None else mask.to(DEV), rope.to(DEV)
        with torch.inference_mode():
            r = ref.layers[layer](x.double(), pos, rope, mask) - x.double()
            outs = [m.layers[layer](xd, pos, rd, md) for m in (fused, unfused, eager)]
        for y in outs:
            assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
        errs.append([_rel(y - xd, r) for y in outs])
        cos = torch.nn.functional.cosine_similarity((outs[0] - xd).double().cpu().flatten(), r.flatten(), dim=0)
        assert cos > MIN_COS[layer], (layer, seqlen, cos)
        pos += seqlen
    return errs


@needs_kernels
@pytest.mark.parametrize("layer", [0, 1], ids=["dense-mlp", "moe"])
def test_kernel_block_against_float64_block(tiny, layer):
    for fused, unfused, eager in _run_block(tiny, layer, seed=11 + layer):
        assert fused <= NO_WORSE * unfused + 5e-3, (fused, unfused)   # no worse than the unfused kernel path
        assert fused <= MAX_REL[layer], (fused, unfused, eager)    # see the module doc for what was measured


@needs_kernels
def test_two_gemms_on_one_quantised_input_when_scales_do_not_stack():
    models = _models(_split_cfg())
    assert models[2].layers[0].w_in is None
    for fused, unfused, eager in _run_block(models, 0, seed=5):
        assert fused <= NO_WORSE * unfused + 5e-3 and fused <= MAX_REL[0], (fused, unfused, eager)


def test_kernel_block_refuses_parts_that_stayed_eager():
    from dskc.runtime.block import KernelBlock
    model = Transformer(get_config("tiny"))
    node = _nodes(compiler.plan(Transformer(get_config("tiny"), device="meta"), "sm90a"))["layers.0"]
    with pytest.raises(ValueError, match="not KernelMLA"):
        KernelBlock(model.layers[0], node)


@needs_kernels
def test_mla_inside_a_fused_block_still_runs_on_its_own(tiny):
    """KernelMLA.forward (its own projections, now views into the block's stacked weight) = the unfused one."""
    eager, ref, fused, unfused = tiny
    x = torch.randn(2, 7, ref.args.dim, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEV)
    n = eager.layers[0].attn_norm(x)
    with torch.inference_mode():
        a, b = (m.layers[0].attn(n, 0, eager.rope[:7], None) for m in (fused, unfused))
    assert torch.isfinite(a).all() and _rel(a, b.double().cpu()) < 1e-2


@needs_kernels
def test_bf16_weights_quantized_ahead_fuse_the_attn_norm_too():
    """quantize_weights turns the attention's linears and the dense MLP FP8: attn_norm and ffn_norm both fuse."""
    from dskc.runtime.block import KernelBlock
    cfg = get_config("tiny", dtype="bf16", n_layers=1)
    model = Transformer(cfg, device=DEV)
    init_random(model, seed=1)
    target = "sm90a" if DEV == "cpu" else "auto"
    on, off = (compiler.compile(model, target, build_kernels=False, progress=False,
                                options=Options(quantize_weights=True, fuse_block_norms=fuse)).module
               for fuse in (True, False))
    assert isinstance(on.layers[0], KernelBlock) and on.layers[0].fuse_attn and on.layers[0].fuse_ffn
    x = torch.randn(2, 7, cfg.dim, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(DEV)
    mask = torch.full((7, 7), float("-inf"), device=DEV).triu_(1)
    with torch.inference_mode():
        a, b = (m.layers[0](x, 0, model.rope[:7], mask) for m in (on, off))
    assert torch.isfinite(a).all() and _rel(a - x, (b - x).double().cpu()) < 5e-2   # 0 on the CPU (identical)
