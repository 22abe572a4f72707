"""Shared pieces of the property-based tests: tiers, seeding, value generators, e4m3 arithmetic, contract checks.

Each property is a plain function `check_<op>(fz, **drawn)`; its test runs it through `run` with the strategies at
TIERS' example counts: 100 in the default tier, 1000 under `-m slow`. Shapes are kept small (the kernels run
through Triton's interpreter in CI). Every example either compares the op with a plain-PyTorch reference in higher
precision (`fz.in_contract()`), or, outside the contract, requires the documented error before any launch
(`with fz.refused(ValueError): ...`); the counts of both are printed at the end of the session.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Callable

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from dskc import knobs

SEED = 20260118
TIERS = [pytest.param(100, id="ci"), pytest.param(1000, id="slow", marks=pytest.mark.slow)]
INTERP = knobs.get().triton_interpret
DEV = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
HALF = (torch.float16,) if INTERP else (torch.float16, torch.bfloat16)  # interpreter: bf16 tl.dot is wrong
FLOATS = (torch.bfloat16, torch.float16, torch.float32)
FP8 = torch.float8_e4m3fn

needs_kernels = pytest.mark.skipif(not torch.cuda.is_available() and not INTERP,
                                   reason="needs a CUDA GPU or TRITON_INTERPRET=1")


@dataclasses.dataclass
class Fuzz:
    """What a property gets first: the no-launch guard and the per-test example counts (printed after the run)."""
    no_launch: Callable
    counts: collections.Counter

    @contextlib.contextmanager
    def refused(self, exc, match=None):
        """The op must raise `exc` (TypeError / ValueError / ..., or an (exception, message regex) pair) before
        launching any kernel."""
        if isinstance(exc, tuple):
            exc, match = exc
        self.counts[f"refused ({exc.__name__})"] += 1
        with self.no_launch(), pytest.raises(exc, match=match):
            yield

    def in_contract(self) -> None:
        self.counts["in contract"] += 1

    def note(self, what: str) -> None:
        """Count a property-specific case (e.g. a non-finite token) in the summary."""
        self.counts[what] += 1

    def confined(self) -> None:
        """Outside the contract but unchecked (validate=False, as under CUDA-graph capture): masked in the kernel."""
        self.counts["confined"] += 1


def run(check, examples: int, fz: Fuzz, **strategies) -> None:
    """Run `check(fz, **drawn)` on `examples` examples drawn from `strategies`: fixed seed (unless the 'explore'
    profile is loaded), failures saved to and replayed from tests/fuzz/examples (keyed by `check`'s source)."""
    test = given(**strategies)(check)
    if settings.get_current_profile_name() != "explore":
        test = seed(SEED)(test)            # (seed() drops the database; the settings below bring it back)
    settings(settings.default, max_examples=examples)(test)(fz)


# ---------------------------------------------------------------- strategies

def sizes(*special: int, lo: int = 1, hi: int = 300):
    """Sizes that matter (1, block multiples +- 1, primes, the given ones) or any in [lo, hi]."""
    edges = [n for n in (1, 2, 3, 7, 13, 31, 63, 64, 65, 127, 128, 129, 255, 256, 257, *special) if lo <= n <= hi]
    return st.one_of(st.sampled_from(sorted(set(edges))), st.integers(lo, hi))


AMAX = st.sampled_from([1e-7, 1e-5, 1e-4 / 448, 1e-3, 0.1, 1.0, 448.0, 3e3, 3e4])   # tiny to huge magnitudes
VALUE_MODES = st.sampled_from(["normal", "normal", "e4m3 grid", "e4m3 midpoints", "ties", "saturate"])


def values(gen: torch.Generator, shape, mode: str, amax: float) -> torch.Tensor:
    """fp32 values of `shape` (generator-seeded): normal * amax, e4m3-representable values, e4m3 rounding
    midpoints (round-to-nearest-even ties), few distinct values (exact ties), or a block at +-448 * scale."""
    x = torch.randn(shape, generator=gen)
    if mode == "e4m3 grid" or mode == "e4m3 midpoints":
        codes = torch.randint(0, 126, shape, generator=gen, dtype=torch.uint8)    # finite positive e4m3 codes
        v = codes.view(FP8).float()
        if mode == "e4m3 midpoints":
            nxt = (codes + 1).view(FP8).float()
            v = (v + nxt) / 2
        sign = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
        x = v * sign / 448.0
    elif mode == "ties":
        x = torch.randint(-3, 4, shape, generator=gen).float() / 4
    elif mode == "saturate":
        x = torch.sign(x) * torch.where(torch.rand(shape, generator=gen) < 0.3, 1.0, torch.rand(shape, generator=gen))
    return x * amax


def poison_non_finite(gen: torch.Generator, x: torch.Tensor, count: int) -> torch.Tensor:
    """x with `count` entries set to NaN / +inf / -inf at random positions."""
    x = x.clone()
    flat = x.view(-1)
    if flat.numel() and count:
        idx = torch.randint(0, flat.numel(), (count,), generator=gen)
        kinds = torch.tensor([float("nan"), float("inf"), float("-inf")])
        flat[idx] = kinds[torch.randint(0, 3, (count,), generator=gen)].to(x.dtype)
    return x


def generator(seed_value: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_value)


SEEDS = st.integers(0, 2 ** 31 - 1)


def sometimes(tenths: int):
    """True in about `tenths` / 10 of the draws (False is the simpler value hypothesis shrinks towards)."""
    return st.integers(0, 9).map(lambda v: v >= 10 - tenths)


def fault_or_none(faults, tenths: int = 3):
    """None (in contract) or, in about `tenths` / 10 of the draws, one of `faults`."""
    return sometimes(tenths).flatmap(lambda bad: st.sampled_from(faults) if bad else st.none())


# ---------------------------------------------------------------- e4m3 arithmetic

def e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """Distance between neighbouring e4m3 values around |v| (v in e4m3 units, float64)."""
    a = v.abs().double().clamp(min=2.0 ** -6)
    return torch.exp2(torch.floor(torch.log2(a)) - 3)


def quant_1x128(x: torch.Tensor, ue8m0: bool = False, div=None):
    """Reference 1x128 quantisation of fp32 rows x [..., K] -> (q e4m3 [..., K], s fp32 [..., ceil(K/128)]).

    amax over the finite elements clamped to 1e-4, s = amax / 448 in fp32 (IEEE division, as the kernel), ue8m0:
    s rounded up to a power of two; q = e4m3(x / s) round-to-nearest-even, NaN where x is not finite.
    """
    x = x.float()
    k = x.shape[-1]
    nb = -(-k // 128)
    finite = torch.isfinite(x)
    xf = torch.where(finite, x, 0.0)
    padded = torch.nn.functional.pad(xf, (0, nb * 128 - k)).reshape(*x.shape[:-1], nb, 128)
    s = padded.abs().amax(-1).clamp_min(1e-4) / 448.0
    if ue8m0:
        bits = s.view(torch.int32)
        expo = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).int()
        s = (expo << 23).view(torch.float32)
    full = s.repeat_interleave(128, -1)[..., :k]
    q = (xf / full).clamp(-448, 448).to(FP8)
    q = torch.where(finite, q.float(), float("nan")).to(FP8)
    return q, s


def dequant_1x128(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    k = q.shape[-1]
    return q.double() * s.double().repeat_interleave(128, -1)[..., :k]


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bitwise equality (NaN payloads of e4m3 aside: every e4m3 NaN compares equal)."""
    if a.dtype == FP8:
        a, b = a.float(), b.float()
    same = (a == b) | (a.isnan() & b.isnan())
    assert bool(same.all()), f"{what}: {int((~same).sum())} of {same.numel()} differ, e.g. {a[~same][:4].tolist()} " \
                             f"vs {b[~same][:4].tolist()}"


# half an ulp (relative) and half the smallest subnormal of each output dtype; the interpreter's fp32 -> bf16 cast
# truncates (a GPU rounds to nearest), so a whole bf16 ulp there
ROUNDING = {torch.bfloat16: (2.0 ** (-7 if INTERP else -8), 2.0 ** -133), torch.float16: (2.0 ** -11, 2.0 ** -25),
            torch.float32: (2.0 ** -20, 2.0 ** -149)}


def assert_gemm_close(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """A GEMM result within the output dtype's rounding of the float64 reference, plus 1e-5 of sum |a| |b| (fp32
    accumulation, per-block promotion); NaN exactly where the reference is NaN."""
    rtol, atol = ROUNDING[out.dtype]
    out, ref, bound = out.double().cpu(), ref.double().cpu(), bound.double().cpu()
    assert torch.equal(out.isnan(), ref.isnan()), f"{what}: NaN where the reference has none (or vice versa)"
    err = torch.where(ref.isnan(), 0.0, (out - ref).abs())
    ok = (err <= rtol * ref.abs() * 1.01 + 1e-5 * bound + atol) | ref.isnan()
    assert bool(ok.all()), f"{what}: max err {err[~ok].max().item():.3g} at |ref| {ref[~ok].abs().max().item():.3g}"


def assert_close(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """|out - ref| <= atol + rtol |ref| elementwise (float64), NaN only where ref is NaN."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert torch.equal(out.isnan(), ref.isnan()), f"{what}: NaN where the reference has none (or vice versa)"
    ok = ((out - ref).abs() <= atol + rtol * ref.abs()) | ref.isnan() | (out == ref)
    assert bool(ok.all()), f"{what}: max err {(out - ref)[~ok].abs().max().item():.3g} (atol {atol}, rtol {rtol})"
