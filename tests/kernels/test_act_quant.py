"""act_quant, rmsnorm_act_quant, silu_mul_act_quant against float64 PyTorch references (interpreter on CPU)."""
import pytest
import torch

from dskc import knobs
from dskc.ops import act_quant, rmsnorm_act_quant, silu_mul_act_quant
from dskc.templates.triton import act_quant as tpl

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or knobs.get().triton_interpret),
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def ref_scales(y: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    """fp32 scales [M, ceil(K/128)] of float64 rows y: max(amax, 1e-4) / 448, optionally up to a power of two."""
    m, k = y.shape
    nb = -(-k // 128)
    padded = torch.zeros(m, nb * 128, dtype=torch.float64)
    padded[:, :k] = y
    s = (padded.view(m, nb, 128).abs().amax(-1).clamp(min=1e-4) / 448.0).float()
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s.double()))).float()
    return s


def ref_quant(x: torch.Tensor, ue8m0: bool):
    """(q, s) of the recipe, in float64 then rounded once to fp32 / e4m3 (round-to-nearest-even)."""
    y = x.double().cpu()
    s = ref_scales(y, ue8m0)
    expanded = s.double().repeat_interleave(128, dim=1)[:, : y.shape[1]]
    q = (y / expanded).float().clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s


def dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    k = q.shape[-1]
    return q.double().cpu() * s.double().cpu().repeat_interleave(128, dim=-1)[..., :k]


def assert_close_quant(q, s, y64: torch.Tensor, ue8m0=False):
    """q * s within half an e4m3 step of y (plus the subnormal step and one bf16 step of y, since the kernel rounds
    its fp32 y to the activation dtype), scales within 1 % of the recipe's."""
    torch.testing.assert_close(s.cpu(), ref_scales(y64, ue8m0), rtol=1e-2, atol=0)
    deq = dequant(q, s)
    step = s.double().cpu().repeat_interleave(128, dim=-1)[..., : y64.shape[1]]
    bound = (0.0625 + 2.0 ** -7) * y64.abs() * 1.01 + step * 2.0 ** -9 + 1e-12
    assert bool(((deq - y64).abs() <= bound).all()), f"max err {(deq - y64).abs().max().item()}"


@pytest.mark.parametrize("M,K", [(1, 256), (37, 200), (16, 384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_act_quant_matches_recipe_bitwise(M, K, dtype, ue8m0):
    x = (torch.randn(M, K) * torch.rand(M, 1) * 10).to(dtype).to(DEV)
    x[0, :100] *= 1e-6  # a block near the amax clamp: subnormal codes
    q, s = act_quant(x, ue8m0=ue8m0)
    q_ref, s_ref = ref_quant(x, ue8m0)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert q.shape == (M, K) and s.shape == (M, -(-K // 128))
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


def test_act_quant_keeps_leading_dims():
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16, device=DEV)
    q, s = act_quant(x)
    q_ref, s_ref = ref_quant(x.view(6, 256), False)
    assert q.shape == (2, 3, 256) and s.shape == (2, 3, 2)
    assert torch.equal(q.view(6, 256).cpu().view(torch.uint8), q_ref.view(torch.uint8))


def ref_rmsnorm(x, weight, eps, residual):
    h = x.double() if residual is None else (x.double() + residual.double()).to(x.dtype).double()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return y.to(x.dtype).double().cpu(), h.to(x.dtype)


@pytest.mark.parametrize("M,K", [(1, 256), (37, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_act_quant(M, K, dtype, with_residual):
    x = torch.randn(M, K).to(dtype).to(DEV)
    weight = (torch.rand(K) + 0.5).to(dtype).to(DEV)
    residual = torch.randn(M, K).to(dtype).to(DEV) if with_residual else None
    outs = rmsnorm_act_quant(x, weight, 1e-6, residual=residual)
    y64, h = ref_rmsnorm(x, weight, 1e-6, residual)
    assert len(outs) == (3 if with_residual else 2)
    assert_close_quant(outs[0], outs[1], y64)
    if with_residual:
        torch.testing.assert_close(outs[2], h, rtol=0, atol=0)


def test_rmsnorm_act_quant_ue8m0_scales_are_powers_of_two():
    x = torch.randn(5, 256, dtype=torch.bfloat16, device=DEV)
    weight = torch.rand(256, dtype=torch.bfloat16, device=DEV) + 0.5
    q, s = rmsnorm_act_quant(x, weight, 1e-5, ue8m0=True)
    assert bool((torch.log2(s) == torch.round(torch.log2(s))).all())
    assert_close_quant(q, s, ref_rmsnorm(x, weight, 1e-5, None)[0], ue8m0=True)


@pytest.mark.parametrize("M,I", [(1, 128), (37, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_act_quant(M, I, dtype):
    gate_up = (torch.randn(M, 2 * I) * 3).to(dtype).to(DEV)
    q, s = silu_mul_act_quant(gate_up)
    g, u = gate_up.double().cpu().split(I, dim=-1)
    y64 = torch.nn.functional.silu(g) * u
    assert q.shape == (M, I) and s.shape == (M, -(-I // 128))
    assert_close_quant(q, s, y64)


def test_e4m3_encoder_is_exhaustively_exact():
    """Every e4m3 value, the midpoints between neighbours (ties to even) and random values, as torch rounds."""
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (codes[1:] + codes[:-1]) / 2
    vals = torch.cat([codes, mids, torch.rand(2000) * 448, torch.rand(500) * 0.02])
    vals = torch.cat([vals, -vals]).view(1, -1)
    pad = (-vals.shape[1]) % 128
    vals = torch.cat([vals, torch.full((1, pad), 448.0)], dim=1).view(-1, 128).to(DEV)
    # amax 448 per row makes the scale 1: the kernel then encodes the values themselves
    vals[:, 0] = 448.0
    q, s = act_quant(vals)
    assert bool((s == 1.0).all())
    assert torch.equal(q.cpu().view(torch.uint8), vals.cpu().to(torch.float8_e4m3fn).view(torch.uint8))


# ---- bad input raises before any launch ----

def test_act_quant_rejects_bad_input():
    x = torch.randn(4, 256, device=DEV)
    with pytest.raises(TypeError, match="dtype"):
        act_quant(x.to(torch.int32))
    with pytest.raises(ValueError, match="block"):
        act_quant(x, block=64)
    with pytest.raises(ValueError, match="contiguous"):
        act_quant(torch.randn(256, 4, device=DEV).t())
    with pytest.raises(TypeError, match="torch.Tensor"):
        act_quant(x.tolist())


def test_fused_quant_rejects_bad_input():
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=DEV)
    w = torch.ones(256, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="weight has"):
        rmsnorm_act_quant(x, torch.ones(128, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(TypeError, match="weight"):
        rmsnorm_act_quant(x, w.float())
    with pytest.raises(ValueError, match="residual shape"):
        rmsnorm_act_quant(x, w, residual=x[:2])
    with pytest.raises(ValueError, match="eps"):
        rmsnorm_act_quant(x, w, eps=0.0)
    with pytest.raises(ValueError, match="even"):
        silu_mul_act_quant(torch.randn(4, 255, device=DEV))
    with pytest.raises(ValueError, match="not in"):
        act_quant(x, config={"BLOCK_Q": 8})
    with pytest.raises(ValueError, match="constraints"):
        act_quant(x, config={"BLOCK_M": 32, "num_warps": 1})


def test_cpu_tensors_need_the_interpreter():
    with knobs.scope(triton_interpret=False):
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            act_quant(torch.randn(4, 256))


def test_defaults_meet_constraints():
    from dskc.templates import registry
    for family, cfg in tpl.DEFAULTS.items():
        assert registry.satisfies(tpl, cfg, {"M": 37, "K": 7168}), family
