"""A minimal kernel used to check that cross-compilation works on this machine (`dskc doctor`, tests)."""
import triton
import triton.language as tl


@triton.jit
def probe_dot_kernel(a, b, c, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        x = tl.load(a + rm[:, None] * K + k0 + rk[None, :], mask=rm[:, None] < M, other=0.0)
        y = tl.load(b + rn[:, None] * K + k0 + rk[None, :], mask=rn[:, None] < N, other=0.0)
        acc += tl.dot(x, tl.trans(y))
    tl.store(c + rm[:, None] * N + rn[None, :], acc.to(c.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))
