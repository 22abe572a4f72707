"""FP8 block-scaled weights: exact dequantisation against float64, quantisation error bounds, bad input."""
import pytest
import torch

from dskc.model import quantize_weight, weight_dequant

SHAPES = [(128, 128), (300, 200), (1, 5), (257, 384)]


def _random_fp8(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 50).to(torch.float8_e4m3fn)
    sm, sn = -(-shape[0] // 128), -(-shape[1] // 128)
    scale = torch.rand(sm, sn, generator=gen) * 0.01 + 1e-4
    return w, scale


def _reference(w, scale):
    """float64 per-element product, block index = element index // 128."""
    rows, cols = torch.arange(w.shape[0]) // 128, torch.arange(w.shape[1]) // 128
    return w.to(torch.float64) * scale.to(torch.float64)[rows][:, cols]


@pytest.mark.parametrize("shape", SHAPES)
def test_dequant_exact_in_float32(shape):
    w, scale = _random_fp8(shape, seed=shape[0])
    got = weight_dequant(w, scale, torch.float32)
    want = _reference(w, scale)
    assert got.dtype == torch.float32 and got.shape == shape
    assert torch.equal(got, want.to(torch.float32))  # one rounding of an exact product


@pytest.mark.parametrize("shape", SHAPES)
def test_dequant_bfloat16_within_one_rounding(shape):
    w, scale = _random_fp8(shape, seed=1 + shape[1])
    got = weight_dequant(w, scale).double()  # default dtype bfloat16
    want = _reference(w, scale)
    assert (got - want).abs().max() <= (want.abs() * 2 ** -8).max()
    assert ((got - want).abs() <= want.abs() * 2 ** -8 + 1e-30).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_quantize_roundtrip(shape, scale_fmt):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 3
    q, scale = quantize_weight(w, scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape
    assert scale.dtype == torch.float32 and scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    back = weight_dequant(q, scale, torch.float32).double()
    s = _reference(torch.ones(shape, dtype=torch.float8_e4m3fn), scale)  # per-element scale
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormal spacing 2^-9 (times the scale)
    assert ((back - w.double()).abs() <= w.double().abs() * 2 ** -4 + s * 2 ** -9).all()
    if scale_fmt is None:  # each block's largest magnitude maps to 448 (when above the 1e-4 amax floor)
        blocks = torch.nn.functional.pad(q.float().abs(), (0, -shape[1] % 128, 0, -shape[0] % 128))
        amax = blocks.view(scale.shape[0], 128, scale.shape[1], 128).amax(dim=(1, 3))
        assert (amax == 448).all()
    else:
        assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))


def test_bad_input_raises():
    w, scale = _random_fp8((300, 200), seed=0)
    with pytest.raises(ValueError, match="scale shape"):
        weight_dequant(w, scale[:2])
    with pytest.raises(TypeError, match="float8"):
        weight_dequant(w.float(), scale)
    with pytest.raises(TypeError, match="float32"):
        weight_dequant(w, scale.double())
    with pytest.raises(ValueError, match="2-D"):
        weight_dequant(w[0], scale)
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="scale_fmt"):
        quantize_weight(torch.randn(3, 4), "e5m2")
