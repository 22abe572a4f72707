"""MLA decode bandwidth on FlashMLA's grid, next to a device-to-device copy measured in the same run.

GB/s counts the cache bytes the step must read (seqlen x 576 x 2 bytes per sequence for bf16, x 656 for FP8),
as FlashMLA reports it. Run on a GPU:  pytest bench/bench_mla.py --benchmark-only -k gpu
The CPU smoke case runs one small decode through the Triton interpreter (TRITON_INTERPRET=1). The grid, operand
builder and timer are shared with `dskc bench --suite mla` (dskc.benchmark.mla), which adds SDPA, torch.compile
and FlashMLA (when importable) in the same run.
"""
import pytest
import torch

from dskc import knobs
from dskc.benchmark.common import FLASHMLA_GRID as GRID  # (h_q, batch, seqlen) of FlashMLA's decode grid
from dskc.benchmark.measure import cuda_time_ms as _time_ms
from dskc.benchmark.mla import decode_operands
from dskc.ops import mla

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def copy_gbps():
    """Device-to-device copy bandwidth (bytes read + written) of a 2 GiB buffer, this run, this GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), samples=10)
    return 2 * src.numel() * 2 / ms / 1e6


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
@pytest.mark.parametrize("h_q,batch,seqlen", GRID)
def test_gpu_decode_bandwidth(benchmark, copy_gbps, h_q, batch, seqlen, kv_format):
    q, cache, bt, seq = decode_operands(h_q, batch, seqlen, kv_format, "cuda")
    meta = mla.get_mla_metadata(seq, h_q, 1)
    scale = 576 ** -0.5

    def step():
        return mla.mla_decode(q, cache, bt, seq, scale, kv_format=kv_format, metadata=meta, validate=False)

    ms = _time_ms(step)
    bytes_read = batch * seqlen * (mla.FP8_TOKEN_BYTES if kv_format == "fp8" else 576 * 2)
    gbps = bytes_read / ms / 1e6
    flops = 2.0 * batch * h_q * seqlen * (576 + 512)
    benchmark.extra_info.update({"gbps": round(gbps, 1), "copy_gbps": round(copy_gbps, 1),
                                 "pct_of_copy": round(100 * gbps / copy_gbps, 1), "tflops": round(flops / ms / 1e9, 1),
                                 "ms": round(ms, 4)})
    benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=5, iterations=1)
    out, lse = step()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_cpu_smoke_decode_interpreted(benchmark):
    """One small decode through the interpreter: fp16, ragged batch, 2 splits per sequence."""
    if torch.cuda.is_available():
        pytest.skip("CPU smoke case; the GPU cases cover this machine")
    if not knobs.get().triton_interpret:
        pytest.skip("no GPU and TRITON_INTERPRET is not set: Triton kernels cannot run here")
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(8, 16, 1, 576, generator=g).half()
    q = torch.randn(2, 1, 4, 576, generator=g).half()
    bt = torch.tensor([[5, 2, 7], [0, 3, 1]], dtype=torch.int32)
    seq = torch.tensor([40, 21], dtype=torch.int32)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, BLOCK_DV=256, num_warps=4, num_stages=1)
    out, lse = benchmark.pedantic(lambda: mla.mla_decode(q, cache, bt, seq, 0.05, config=cfg), rounds=1,
                                  iterations=1)
    k = cache[bt[0].long()].reshape(-1, 576)[:40].double()
    p = torch.softmax(q[0, 0].double() @ k.T * 0.05, -1)
    torch.testing.assert_close(out[0, 0].double(), p @ k[:, :512], atol=3e-3, rtol=1e-2)
