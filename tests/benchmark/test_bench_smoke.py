"""`dskc bench --suite smoke` end to end on the CPU (interpreter), its result files, and the schema validator.

The smoke run happens once per module (~10 s on 2 cores); the tests read its files.
"""
from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from dskc import knobs
from dskc.benchmark import cli, measure, report, schema

pytestmark = pytest.mark.skipif(not knobs.get().triton_interpret,
                                reason="the smoke suite runs Triton kernels on the CPU: set TRITON_INTERPRET=1")

# stem -> largest relative error of dskc's output against the float64 torch reference in the test inputs' dtype
TOLERANCE = {"fp8_gemm_1d2d": 2e-2, "bf16_gemm": 2e-3, "act_quant": 1e-2, "grouped_gemm": 2e-3, "fused_moe": 3e-2,
             "moe_route": 1e-5, "mla_decode": 3e-3, "mla_prefill": 3e-3, "mla_rope": 1e-5, "model": 5e-2}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["--suite", "smoke", "--out", str(out), "--quiet"])
    folder = out / "cpu-smoke"
    return {"rc": rc, "folder": folder, "json": folder / "smoke.json", "md": folder / "smoke.md",
            "png": folder / "smoke.png"}


@pytest.fixture()
def doc(smoke):
    return json.loads(smoke["json"].read_text())


def test_smoke_writes_valid_labelled_files(smoke):
    assert smoke["rc"] == 0
    assert sorted(p.name for p in smoke["folder"].iterdir()) == ["smoke.json", "smoke.md", "smoke.png"]
    d = schema.load(smoke["json"])
    assert d["mode"] == "cpu-smoke" and d["label"] == schema.SMOKE_LABEL and d["env"]["gpu"] is None
    assert smoke["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and smoke["png"].stat().st_size > 10_000
    md = smoke["md"].read_text()
    assert "NOT kernel performance" in md and "![smoke plot](smoke.png)" in md
    for section in ("## gemm", "## moe", "## mla", "## model", "## KV cache bytes per token"):
        assert section in md


def test_every_suite_and_stem_ran_and_matches_its_reference(doc):
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["suite"] for r in ok} == {"gemm", "moe", "mla", "model"}
    stems = {r["stem"] for r in ok if r["impl"] in ("dskc-default", "dskc")}
    assert stems == set(TOLERANCE)
    for r in ok:
        if r["impl"] in ("dskc-default", "dskc") and r["shape"].get("phase") != "decode":
            assert r["rel_err"] is not None and r["rel_err"] < TOLERANCE[r["stem"]], (r["case"], r["rel_err"])
        assert r["ms"] > 0 and r[r["primary"]] > 0


def test_baselines_and_ceilings_are_measured_in_the_same_run(doc):
    impls = {(r["suite"], r["impl"]) for r in doc["results"] if r["status"] == "ok"}
    for want in (("gemm", "torch-bf16"), ("gemm", "torch-scaled-mm"), ("moe", "torch-grouped-mm"),
                 ("mla", "torch-sdpa"), ("model", "torch-bf16")):
        assert want in impls
    skipped = [r for r in doc["results"] if r["impl"] == "torch-compile"]
    assert skipped and all(r["status"] == "skipped" and r["note"] for r in skipped)
    ce = doc["ceilings"]
    assert ce["bf16_matmul"]["value"] > 0 and ce["copy"]["value"] > 0
    gemm = next(r for r in doc["results"] if r["impl"] == "dskc-default" and r["stem"] == "fp8_gemm_1d2d")
    assert gemm["pct_compute"] == pytest.approx(100 * gemm["tflops"] / ce["bf16_matmul"]["value"])
    assert gemm["tflops"] == pytest.approx(2 * 3 * 72 * 128 / gemm["ms"] / 1e9)


def test_transformers_deepseek_runs_through_the_dskc_backend(doc):
    """The model suite's drop-in row: transformers' DeepseekV3ForCausalLM through torch.compile(backend="dskc")
    (interpreted, rest on aot_eager) against eager float32; backend="inductor" runs on a GPU only."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    rows = {r["impl"]: r for r in doc["results"] if r["case"].startswith("transformers deepseek-v3")}
    assert rows["dskc-backend"]["status"] == "ok" and rows["dskc-backend"]["rel_err"] < TOLERANCE["model"]
    assert rows["torch-bf16"]["status"] == "ok" and rows["torch-compile"]["status"] == "skipped"


def test_model_rows_report_launches_per_step(doc, smoke):
    """Beside tokens/s: the kernels one step launches (dskc.runtime.counter); dskc's decode step (1 dense layer of
    tiny) well under the eager model's."""
    rows = {(r["shape"]["phase"], r["impl"]): r for r in doc["results"]
            if r["suite"] == "model" and r["status"] == "ok" and not r["case"].startswith("transformers")}
    for phase in ("prefill", "decode"):
        for impl in ("dskc", "torch-bf16"):
            assert isinstance(rows[(phase, impl)]["launches_per_step"], int), (phase, impl)
    dskc, eager = rows[("decode", "dskc")]["launches_per_step"], rows[("decode", "torch-bf16")]["launches_per_step"]
    assert 0 < dskc <= 16 and dskc * 5 < eager, (dskc, eager)
    assert f"{dskc} launches" in smoke["md"].read_text()


def test_kv_cache_bytes_per_token(doc):
    kv = {(k["model"], k["attn_impl"], k["dtype"]): k["bytes_per_token"] for k in doc["kv_cache"]}
    assert kv[("deepseek-v3", "absorb", "bf16")] == 61 * 576 * 2
    assert kv[("deepseek-v3", "naive", "bf16")] == 61 * 128 * (192 + 128) * 2
    assert kv[("deepseek-v3", "absorb", "fp8 (656 B/layer)")] == 61 * 656


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("ceilings"), "missing required field(s) ['ceilings']"),
    (lambda d: d.update(mode="laptop"), "$.mode: 'laptop' is not one of"),
    (lambda d: d["results"][0].update(ms="fast"), "$.results[0].ms: expected number or null"),
    (lambda d: d["results"][0].update(tflops=-1.0), "$.results[0].tflops: -1.0 is below the minimum 0"),
    (lambda d: d["results"][0].update(colour="red"), "$.results[0]: unknown field 'colour'"),
    (lambda d: d.update(label="fast numbers"), "a cpu-smoke result must carry the label"),
    (lambda d: d["results"][0].update(ms=None), "a measured ok row needs ms"),
    (lambda d: d["results"][0].update(status="error", note=""), "row must say why in note"),
    (lambda d: d["ceilings"]["copy"].update(unit="MB/s"), "$.ceilings.copy.unit"),
    (lambda d: d["kv_cache"][0].update(bytes_per_token=1.5), "$.kv_cache[0].bytes_per_token: expected integer"),
])
def test_malformed_result_is_rejected_with_a_clear_error(doc, edit, message):
    bad = copy.deepcopy(doc)
    edit(bad)
    with pytest.raises(schema.ResultSchemaError) as err:
        schema.validate(bad)
    assert message in str(err.value)


def test_published_row_must_name_hardware_and_source(doc):
    bad = copy.deepcopy(doc)
    row = dict(bad["results"][0], kind="published", impl="published-deepgemm", hardware=None, source=None)
    bad["results"].append(row)
    bad["impls"]["published-deepgemm"] = "x"
    with pytest.raises(schema.ResultSchemaError, match="must name its hardware and source"):
        schema.validate(bad)


def test_cli_validate_reports_bad_files(tmp_path, smoke, capsys):
    assert cli.main(["--validate", str(smoke["json"])]) == 0
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert cli.main(["--validate", str(broken)]) == 1
    assert f"{broken}: cannot read a JSON result" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"schema": "dskc-bench"}))
    assert cli.main(["--validate", str(wrong)]) == 1
    assert "missing required field(s)" in capsys.readouterr().err


def test_render_writes_table_and_plot_of_a_result(tmp_path, smoke, capsys):
    assert cli.main(["--render", str(smoke["json"]), "--out", str(tmp_path)]) == 0
    folder = tmp_path / "cpu-smoke"
    assert sorted(p.name for p in folder.iterdir()) == ["smoke.json", "smoke.md", "smoke.png"]
    assert schema.load(folder / "smoke.json") == schema.load(smoke["json"])
    assert (folder / "smoke.md").read_text() == smoke["md"].read_text()
    assert "wrote png:" in capsys.readouterr().out


def test_gpu_suite_without_gpu_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(["--suite", "gemm", "--out", str(tmp_path)]) == 2
    assert "need a CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_gpu_slug_and_markdown_cells():
    assert measure.gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert measure.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    with pytest.raises(ValueError, match="empty folder name"):
        measure.gpu_slug("  ")
    row = {"status": "ok", "primary": "tflops", "tflops": 812.34, "pct_compute": 82.1, "pct_bandwidth": None,
           "kind": "measured"}
    assert report._cell(row) == "812.3 (82%)"
    assert report._cell(dict(row, kind="published")) == "812.3"
    assert report._cell(dict(row, status="error")) == "error"
    rows = [dict(row, impl="dskc-default"), dict(row, impl="torch-bf16", tflops=406.17),
            dict(row, impl="published-deepgemm", kind="published", tflops=1500.0)]
    assert report._ratio(rows) == "2.00x"


def _tuned_file(root, config):
    folder = root / "sm90a"
    folder.mkdir(parents=True)
    entry = {"bucket": {"M": 4, "N": 72, "K": 128}, "config": config,
             "meta": {"gpu": "test", "toolchain": {}, "timing_mode": "model", "date": "2026-11-23"}}
    (folder / "fp8_gemm_1d2d.json").write_text(json.dumps({
        "format": 1, "stem": "fp8_gemm_1d2d", "arch": "sm90a", "buckets": {"M": "pow2", "N": "exact", "K": "exact"},
        "entries": {"M=4,N=72,K=128": entry}}))


def test_tuned_row_uses_the_exported_config_and_reports_a_missing_one(tmp_path):
    """dskc-tuned runs the autotuner's export for the shape (here a small tile, through the interpreter); a shape
    without an entry gives a skipped row that says so; both next to the default row of the same case."""
    from dskc.benchmark import gemm
    from dskc.benchmark.common import Ctx
    from dskc.benchmark.runner import run_impl

    config = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "SPLIT_K": 1, "UPCAST": 0,
              "num_warps": 4, "num_stages": 2}
    _tuned_file(tmp_path, config)
    ctx = Ctx("cpu", True, "sm90a", None, "off")
    ceilings = {"bf16_matmul": {"value": 1.0}, "copy": {"value": 1.0}}
    with knobs.scope(tuned_dir=tmp_path):
        case = gemm.fp8_case(ctx, 4, 72, 128, "tuned")
        other = gemm.fp8_case(ctx, 4, 200, 128, "untuned")
    rows = {i.name: run_impl(ctx, case, i, ceilings) for i in case.impls}
    assert rows["dskc-tuned"]["status"] == "ok" and "'BLOCK_M': 16" in rows["dskc-tuned"]["note"]
    assert rows["dskc-tuned"]["rel_err"] < 2e-2 and rows["dskc-default"]["rel_err"] < 2e-2
    missing = next(i for i in other.impls if i.name == "dskc-tuned")
    assert missing.skip and "no tuned entry for fp8_gemm_1d2d" in missing.skip


def test_unreadable_tuned_export_is_an_error_row(tmp_path):
    from dskc.benchmark import gemm
    from dskc.benchmark.common import Ctx
    from dskc.benchmark.runner import run_impl

    (tmp_path / "sm90a").mkdir()
    (tmp_path / "sm90a" / "fp8_gemm_1d2d.json").write_text("{broken")
    ctx = Ctx("cpu", True, "sm90a", None, "off")
    with knobs.scope(tuned_dir=tmp_path):
        case = gemm.fp8_case(ctx, 4, 72, 128, "tuned")
    impl = next(i for i in case.impls if i.name == "dskc-tuned")
    row = run_impl(ctx, case, impl, {"bf16_matmul": {"value": 1.0}, "copy": {"value": 1.0}})
    assert row["status"] == "error" and "TunedFileError" in row["note"] and "cannot be read" in row["note"]


def test_committed_results_follow_the_schema():
    """Every result file committed under bench/results/ validates against the current schema."""
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[2] / "bench" / "results").glob("*/*.json"))
    assert any(f.parent.name == "cpu-smoke" for f in files)
    for f in files:
        doc = schema.load(f)
        assert (doc["mode"] == "cpu-smoke") == (f.parent.name == "cpu-smoke")
        assert f.with_suffix(".md").stat().st_size > 0
