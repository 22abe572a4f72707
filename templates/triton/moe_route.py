"""Stem moe_route: DeepSeek-V3's Gate after the gate projection, in one kernel.

Input: logits [T, E] fp32 (x @ W_gate^T) and an optional per-expert bias [E] fp32. Per token:
  1. scores = sigmoid(logits) or softmax(logits) over the E experts;
  2. sel = scores + bias (the bias steers SELECTION only);
  3. with N_GROUPS > 1: group score = sum of the top-2 `sel` in the group when a bias exists, else the group max;
     keep the N_LIMITED best groups, every expert of the other groups drops out;
  4. the TOP_K best `sel` among the kept experts, in descending order;
  5. weights = scores (WITHOUT bias) at those experts; divided by their sum when RENORM (by default: under sigmoid,
     as DeepSeek-V3's Gate; transformers' norm_topk_prob / Mixtral's softmax top-k renormalise too); times
     route_scale.
Output: weights [T, TOP_K] fp32 and expert ids [T, TOP_K] int32. With N_SHARED > 0 each row has N_SHARED more
columns: the shared experts as always-selected experts E .. E + N_SHARED - 1 of weight 1 (the grouped GEMMs then run
them with the routed ones: dskc.ops.moe.fused_moe's n_shared).

`moe_route_align_kernel` (Problem.align = 1, decode sizes) is one program that routes every token and then lays the
assignments out for the masked grouped GEMM, as moe_permute's count / scan / scatter do (expert e's rows are
[e * T, e * T + count_e), in token order): routing and permutation in one launch.

Ties: every selection takes the LOWEST index among exactly equal values (expert index for experts, group index for
groups). That is what a stable descending sort picks; torch.topk gives the same on inputs without exact ties (the
random inputs of the tests) and does not document its choice on exact ties.

Non-finite values: a NaN selection score (or group score) ranks below -inf; each pick is taken among the experts
(groups) not yet picked, so the ids are always TOP_K distinct experts of [0, E) from the kept groups, whatever the
logits (a row of NaN picks the lowest indices). Weights follow the arithmetic: softmax of a row holding NaN, +inf or
only -inf is NaN, as torch.softmax gives; a NaN weight never leaves its token.

One program handles BLOCK_T tokens with all E experts in registers (E padded to BLOCK_E, a power of two); each of
the N_GROUPS group scores, N_LIMITED group picks and TOP_K expert picks is one masked max/min reduction over the
row, unrolled at compile time (E = 256, TOP_K = 8, 8 groups: 8 + 4 + 8 reductions per row).
"""
from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from dskc.build.triton_xc import CompileSpec
from dskc.templates.triton._problem import ProblemBase, launch as _launch, pow2
from dskc.templates.triton.moe_permute import _one_hot

STEM = "moe_route"


@dataclasses.dataclass(frozen=True)
class Problem(ProblemBase):
    """T tokens routed over E experts: top_k, group limits, sigmoid (1) or softmax (0) scores, a bias or not, and
    whether the top-k weights are renormalised to sum 1 (renorm -1: as the score function implies, 1 for sigmoid)."""
    T: int
    E: int
    top_k: int
    n_groups: int = 1
    n_limited_groups: int = 1
    sigmoid: int = 0
    has_bias: int = 0
    renorm: int = -1         # top-k weights divided by their sum: 1 / 0, or -1: as the score function implies
    n_shared: int = 0        # always-selected shared experts appended to each token's assignments
    align: int = 0           # 1: one program also builds the masked layout (moe_route_align_kernel)
    BUCKETS = {"T": "pow2"}

    def __post_init__(self):
        object.__setattr__(self, "sigmoid", int(bool(self.sigmoid)))
        object.__setattr__(self, "has_bias", int(bool(self.has_bias)))
        object.__setattr__(self, "renorm", self.sigmoid if self.renorm in (-1, None) else int(bool(self.renorm)))
        object.__setattr__(self, "align", int(bool(self.align)))

SPACE = {
    "BLOCK_T": (1, 2, 4, 8, 16, 32),
    "num_warps": (1, 2, 4, 8),
}

CONSTRAINTS = (
    "BLOCK_T * max(E, 32) <= 8192",     # the score row block lives in registers (<= 64 fp32 per thread at 4 warps)
)

DEFAULTS = {
    "sm80": {"BLOCK_T": 4, "num_warps": 4},
    "sm90": {"BLOCK_T": 4, "num_warps": 4},
    "sm100": {"BLOCK_T": 4, "num_warps": 4},
}


def problem_names() -> tuple[str, ...]:
    return Problem.names()


def rule(problem: Problem, family: str, base: dict, sms: int, fits) -> dict:
    """Tokens per program: the base's 4, or fewer when there are fewer tokens."""
    cfg = {**base, "BLOCK_T": min(base["BLOCK_T"], pow2(problem.T))}
    return cfg if fits(cfg) else dict(base)


def cost(problem: dict) -> tuple[float, float]:
    """(flops, bytes): a few passes over the [T, E] scores; reads logits, writes weights and ids."""
    t, e, k = problem["T"], problem["E"], problem["top_k"]
    passes = 3 + 2 * problem["n_groups"] + problem["n_limited_groups"] + 2 * k
    return float(t * e * passes), float(4 * t * e + 4 * e + 8 * t * k)


def block_e(E: int) -> int:
    return triton.next_power_of_2(max(E, 2))


def constexprs(problem, config: dict) -> dict:
    """The kernel's compile-time arguments for a problem and config."""
    p = Problem.of(problem)
    cx = {"E": p.E, "BLOCK_E": block_e(p.E), "N_GROUPS": p.n_groups, "N_LIMITED": p.n_limited_groups,
          "BLOCK_G": triton.next_power_of_2(p.n_groups), "TOP_K": p.top_k, "N_SHARED": p.n_shared,
          "BLOCK_K": triton.next_power_of_2(p.top_k + p.n_shared), "SIGMOID": p.sigmoid, "HAS_BIAS": p.has_bias,
          "RENORM": p.renorm, "BLOCK_T": config["BLOCK_T"]}
    if p.align:      # the layout's one-hot [BLOCK_A, experts] tile within moe_permute's register budget
        be = block_e(p.E + p.n_shared)
        cx.update(BLOCK_E2=be, BLOCK_A=max(16, 2048 * config["num_warps"] // be))
    return cx


def bind(problem: Problem, config: dict) -> dict:
    """{kernel name: launch keyword arguments} for (problem, config)."""
    name = "moe_route_align_kernel" if problem.align else "moe_route_kernel"
    return {name: _launch(constexprs(problem, config), config, num_stages=1)}


def compile_specs(problem, config: dict) -> list[CompileSpec]:
    problem = Problem.of(problem)
    sig = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "weights_ptr": "*fp32", "ids_ptr": "*i32"}
    if problem.align:
        sig.update({"dest_ptr": "*i32", "sorted_ptr": "*i32", "counts_ptr": "*i32"})
    sig.update({"T": "i32", "route_scale": "fp32"})
    ((name, kw),) = bind(problem, config).items()
    cx = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
    sig.update({k: "constexpr" for k in cx})
    return [CompileSpec.make(__name__, name, sig, cx, num_warps=kw["num_warps"], num_stages=kw["num_stages"])]


@triton.jit
def _first_max(v, avail, cols, BIG: tl.constexpr):
    """Per row: the max of v [R, C] (no NaN) over the `avail` columns and the lowest such column holding it.

    Every row must have an available column; an available -inf is picked like any value (never a column outside
    `avail`: the ids stay in range and distinct when the scores run out)."""
    m = tl.max(tl.where(avail, v, float("-inf")), 1)
    idx = tl.min(tl.where(avail & (v == m[:, None]), cols[None, :], BIG), 1)
    return m, idx


@triton.jit
def _no_nan(v):
    """NaN -> -inf: a NaN score ranks below every number (and compares equal to itself for the picks)."""
    return tl.where(v == v, v, float("-inf"))


@triton.jit
def _limit_groups(sel, cols, E: tl.constexpr, BLOCK_E: tl.constexpr, N_GROUPS: tl.constexpr,
                  N_LIMITED: tl.constexpr, BLOCK_G: tl.constexpr, HAS_BIAS: tl.constexpr):
    """[R, BLOCK_E] mask of the experts in the N_LIMITED best groups of each row (sel: no NaN)."""
    GS: tl.constexpr = E // N_GROUPS
    grp = cols // GS
    gcols = tl.arange(0, BLOCK_G)
    gscore = tl.full([sel.shape[0], BLOCK_G], float("-inf"), tl.float32)
    for g in tl.static_range(N_GROUPS):
        ing = (grp == g)[None, :]
        m, idx = _first_max(sel, ing, cols, BLOCK_E)
        if HAS_BIAS:  # top-2 sum: drop the first max once, take the max again (+inf + -inf is NaN: ranks last)
            m = _no_nan(m + tl.max(tl.where(ing & (cols[None, :] != idx[:, None]), sel, float("-inf")), 1))
        gscore = tl.where(gcols[None, :] == g, m[:, None], gscore)
    gfree = tl.zeros(gscore.shape, tl.int1) | (gcols < N_GROUPS)[None, :]
    keep = tl.zeros(sel.shape, tl.int1)
    for j in tl.static_range(N_LIMITED):
        gm, gi = _first_max(gscore, gfree, gcols, BLOCK_G)
        keep = keep | (grp[None, :] == gi[:, None])
        gfree = gfree & (gcols[None, :] != gi[:, None])
    return keep


@triton.jit
def _route_rows(logits_ptr, bias_ptr, rows, T, route_scale, E: tl.constexpr, BLOCK_E: tl.constexpr,
                N_GROUPS: tl.constexpr, N_LIMITED: tl.constexpr, BLOCK_G: tl.constexpr, TOP_K: tl.constexpr,
                N_SHARED: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                RENORM: tl.constexpr):
    """(weights [R, BLOCK_K] fp32, ids [R, BLOCK_K] int32) of token rows `rows` (see the module docstring)."""
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    x = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        xm = tl.where(cmask[None, :], x, float("-inf"))
        ex = tl.exp(xm - tl.max(xm, 1)[:, None])
        scores = ex / tl.sum(ex, 1)[:, None]
    sel = scores
    if HAS_BIAS:
        sel = scores + tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
    sel = _no_nan(sel)
    free = tl.zeros([rows.shape[0], BLOCK_E], tl.int1) | cmask[None, :]   # experts still to pick from
    if N_GROUPS > 1:
        free = free & _limit_groups(sel, cols, E, BLOCK_E, N_GROUPS, N_LIMITED, BLOCK_G, HAS_BIAS)
    kcols = tl.arange(0, BLOCK_K)
    wts = tl.zeros([rows.shape[0], BLOCK_K], tl.float32)
    ids = tl.zeros([rows.shape[0], BLOCK_K], tl.int32)
    for j in tl.static_range(TOP_K):
        m, idx = _first_max(sel, free, cols, BLOCK_E)
        hit = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), 1)
        wts = tl.where(kcols[None, :] == j, w[:, None], wts)
        ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
        free = free & ~hit
    if RENORM:
        wts = wts / tl.sum(wts, 1)[:, None]
    wts = wts * route_scale
    if N_SHARED > 0:            # the shared experts: E .. E + N_SHARED - 1, weight 1, after the routed ones
        shared = (kcols >= TOP_K)[None, :]
        wts = tl.where(shared, 1.0, wts)
        ids = tl.where(shared, E + kcols[None, :] - TOP_K, ids)
    return wts, ids


@triton.jit
def _store_rows(weights_ptr, ids_ptr, rows, T, wts, ids, K_ALL: tl.constexpr, BLOCK_K: tl.constexpr):
    kcols = tl.arange(0, BLOCK_K)
    omask = (rows < T)[:, None] & (kcols < K_ALL)[None, :]
    offs = rows[:, None] * K_ALL + kcols[None, :]
    tl.store(weights_ptr + offs, wts, mask=omask)
    tl.store(ids_ptr + offs, ids, mask=omask)


@triton.jit
def moe_route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, T, route_scale,
                     E: tl.constexpr, BLOCK_E: tl.constexpr, N_GROUPS: tl.constexpr, N_LIMITED: tl.constexpr,
                     BLOCK_G: tl.constexpr, TOP_K: tl.constexpr, N_SHARED: tl.constexpr, BLOCK_K: tl.constexpr,
                     SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    wts, ids = _route_rows(logits_ptr, bias_ptr, rows, T, route_scale, E, BLOCK_E, N_GROUPS, N_LIMITED, BLOCK_G,
                           TOP_K, N_SHARED, BLOCK_K, SIGMOID, HAS_BIAS, RENORM)
    _store_rows(weights_ptr, ids_ptr, rows, T, wts, ids, TOP_K + N_SHARED, BLOCK_K)


@triton.jit
def moe_route_align_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, dest_ptr, sorted_ptr, counts_ptr, T,
                           route_scale, E: tl.constexpr, BLOCK_E: tl.constexpr, N_GROUPS: tl.constexpr,
                           N_LIMITED: tl.constexpr, BLOCK_G: tl.constexpr, TOP_K: tl.constexpr,
                           N_SHARED: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr,
                           HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_E2: tl.constexpr, BLOCK_A: tl.constexpr):
    """One program: route every token, then the masked layout of the E + N_SHARED experts (M_MAX = T rows each):
    dest [T * K] (row of each assignment), sorted [E2 * T] (assignment of each used row), counts [E2]."""
    K_ALL: tl.constexpr = TOP_K + N_SHARED
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        wts, ids = _route_rows(logits_ptr, bias_ptr, rows, T, route_scale, E, BLOCK_E, N_GROUPS, N_LIMITED,
                               BLOCK_G, TOP_K, N_SHARED, BLOCK_K, SIGMOID, HAS_BIAS, RENORM)
        _store_rows(weights_ptr, ids_ptr, rows, T, wts, ids, K_ALL, BLOCK_K)
    tl.debug_barrier()              # the layout reads the ids every thread wrote
    n_assign = T * K_ALL
    ecols = tl.arange(0, BLOCK_E2)
    running = tl.zeros([BLOCK_E2], tl.int32)
    for a0 in range(0, n_assign, BLOCK_A):
        hot, _ = _one_hot(ids_ptr, a0, n_assign, E + N_SHARED, BLOCK_E2, BLOCK_A)    # ids in range: just routed
        offs = a0 + tl.arange(0, BLOCK_A)
        rank = tl.sum(hot * (tl.cumsum(hot, 0) - hot + running[None, :]), 1)
        dest = tl.sum(hot * ecols[None, :], 1) * T + rank
        ok = (offs < n_assign) & (tl.sum(hot, 1) > 0)
        tl.store(dest_ptr + offs, tl.where(ok, dest, -1), mask=offs < n_assign)
        tl.store(sorted_ptr + dest, offs, mask=ok)
        running += tl.sum(hot, 0)
    tl.store(counts_ptr + ecols, running, mask=ecols < E + N_SHARED)
