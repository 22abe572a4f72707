"""The bench runner's time bounds, its per-case writes and the headline / rest split, on the CPU (no kernels run:
the cases are sleeps, so the figures are timings of the runner itself)."""
from __future__ import annotations

import time

import pytest

from dskc.benchmark import measure, runner
from dskc.benchmark.cases import Case, Impl
from dskc.benchmark.common import DEEPGEMM_DENSE, FLASHMLA_GRID, Ctx

CEILINGS = {"bf16_matmul": {"value": 1.0}, "copy": {"value": 1.0}}
CTX = Ctx("cpu", True, None, None, "off")


def _sleeper(seconds, swallow=False):
    """make() -> a call that sleeps; swallow: the call catches Exception around its sleep, as torch.compile's
    autotuning does around each candidate."""
    def call():
        if not swallow:
            time.sleep(seconds)
            return
        try:
            time.sleep(seconds)
        except Exception:   # noqa: BLE001 - the point: a broad handler must not swallow the time limit
            pass
    return lambda: call


@pytest.fixture()
def three_cases(monkeypatch):
    """3 cases of a fast row (0.01 s a call) and a torch.compile row (0.5 s a call: 1 s with its first call)."""
    def cases(name, ctx):
        for i in range(3):
            yield Case("gemm", f"case {i}", "x", {"i": i}, (Impl("torch-bf16", _sleeper(0.01)),
                                                           Impl("torch-compile", _sleeper(0.5, swallow=True))),
                       flops=1e3, bytes=1e3)
    monkeypatch.setattr(runner, "_suite_cases", cases)
    monkeypatch.setattr(runner.gc, "collect", lambda: 0)   # ~0.3 s a case with torch loaded: not under test


def _run(**kw):
    t0 = time.perf_counter()
    rows = runner.run_cases(CTX, "gemm", CEILINGS, runner.Options("gemm", None, progress=False, **kw))
    return [r["status"] for r in rows], rows, time.perf_counter() - t0


def test_compile_budget_stops_the_running_row_and_skips_later_ones(three_cases):
    statuses, rows, took = _run(compile_budget_s=0.2)
    assert statuses == ["ok", "skipped", "ok", "skipped", "ok", "skipped"]
    assert rows[1]["note"].startswith("stopped after 0.2 s: torch.compile budget of 0.2 s for suite gemm")
    assert rows[3]["note"] == "torch.compile budget of 0.2 s for suite gemm spent"
    assert took < 1.0, took             # unbounded: 3 s of torch.compile rows


@pytest.mark.parametrize("bound, message", [("budget_s", "time budget of 0.3 s for suite gemm"),
                                            ("time_limit_s", "time limit of 0.3 s for the run")])
def test_suite_budget_and_run_limit_stop_the_running_row(three_cases, bound, message):
    statuses, rows, took = _run(**{bound: 0.3})
    assert statuses == ["ok", "skipped", "skipped", "skipped", "skipped", "skipped"]
    assert rows[1]["note"].startswith("stopped after 0.") and rows[1]["note"].endswith(message)
    assert all(r["note"] == f"{message} spent" for r in rows[2:])
    assert took < 0.8, took


def test_time_limit_restores_the_alarm_and_an_outer_timer():
    import signal

    before = signal.getsignal(signal.SIGALRM)
    with measure.time_limit(5.0):
        time.sleep(0.01)
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        with pytest.raises(measure.TimeLimit):
            with measure.time_limit(0.05):
                time.sleep(1)
        assert 29 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30   # the outer timer runs on
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_every_case_publishes_a_valid_partial_document(three_cases, monkeypatch, tmp_path):
    """build_doc hands over the document after each case and after the sub-suite, so a killed run keeps its rows;
    run() with json_only writes only the JSON."""
    monkeypatch.setattr(measure, "ceilings", lambda device: {
        "bf16_matmul": {"name": "x", "kind": "compute", "ms": 1.0, "value": 1.0, "unit": "TFLOP/s", "detail": ""},
        "copy": {"name": "y", "kind": "bandwidth", "ms": 1.0, "value": 1.0, "unit": "GB/s", "detail": ""}})
    seen = []
    opts = runner.Options("gemm", tmp_path, compile_mode=None, progress=False, smoke=True, json_only=True,
                          compile_budget_s=0.01)
    runner.build_doc(opts, on_update=lambda doc, complete: seen.append((len(doc["results"]), complete)))
    assert seen == [(2, False), (4, False), (6, False), (6, True)]
    paths = runner.run(opts)
    assert set(paths) == {"json"} and sorted(p.name for p in paths["json"].parent.iterdir()) == ["gemm.json"]


def test_headline_and_rest_split_the_gpu_cases():
    """headline: DeepGEMM's dense table (10 shapes), the MoE layer, MLA decode at h_q 16 / 128 (16 of 32 grid
    points x 2 cache formats); rest: everything else. A smoke run keeps every case of the headline stems."""
    def case(stem, shape):
        return Case("gemm", "c", stem, shape, ())
    fp8 = [case("fp8_gemm_1d2d", {"M": m, "N": n, "K": k}) for m, n, k in DEEPGEMM_DENSE]
    fp8_other = case("fp8_gemm_1d2d", {"M": 64, "N": 7168, "K": 2048})
    decode = [case("mla_decode", {"h_q": h, "batch": b, "seqlen": s, "kv_format": kv})
              for h, b, s in FLASHMLA_GRID for kv in ("bf16", "fp8")]
    layer, prefill = case("fused_moe", {"tokens": 1}), case("mla_prefill", {"heads": 128})
    head = [c for c in fp8 + [fp8_other] + decode + [layer, prefill] if runner.selected("headline", c, False)]
    assert len(head) == 10 + 16 + 1 and fp8_other not in head and prefill not in head
    assert {c.shape["h_q"] for c in head if c.stem == "mla_decode"} == {16, 128}
    for c in fp8 + [fp8_other] + decode + [layer, prefill]:
        assert runner.selected("rest", c, False) != (c in head) and runner.selected("all", c, False)
    assert runner.selected("headline", fp8_other, True) and not runner.selected("rest", fp8_other, True)
