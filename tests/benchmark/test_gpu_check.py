"""bench/gpu_check.sh in its dry mode on the CPU, so that a shell mistake cannot cost the one GPU call a lent host
gets: the same steps in the same order under the script's own deadline (100 s here, 420 s on the host), pytest steps
only collecting (the test files and node ids it names must exist), bench steps on tiny shapes through the Triton
interpreter, a stand-in nvcc that fails every build, files in a temporary OUT. One run (~100 s on 2 cores) serves
every test here; the figures it writes are CPU timings, not kernel performance."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dskc import knobs
from dskc.benchmark import schema

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["install", "env", "stems", "model", "headline", "cutlass", "cutlass-bench", "autotune", "rest"]
DEVICE_CALL = 'run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)'
BUDGET = 100
HEADLINE_STEMS = {"fp8_gemm_1d2d", "fused_moe", "mla_decode"}

pytestmark = pytest.mark.skipif(not knobs.get().triton_interpret,
                                reason="the dry run's bench steps run Triton kernels on the CPU: TRITON_INTERPRET=1")

FAKE_NVCC = """#!/bin/sh
case "$1" in --version) echo "Cuda compilation tools, release 13.0, V13.0.88"; exit 0;; esac
sleep 1; echo "error: stand-in nvcc of the dry run" >&2; exit 1
"""


def _plan() -> dict:
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, check=True).stdout
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (\S+) +(\d+)", out, re.M)}


def test_plan_adds_up_to_the_budget_and_the_call_is_written_down():
    plan = _plan()
    assert list(plan)[:-2] == STEPS and list(plan)[-2:] == ["reserve", "total"]
    assert sum(plan[s] for s in STEPS) + plan["reserve"] == plan["total"] <= 420
    assert DEVICE_CALL in SCRIPT.read_text() and DEVICE_CALL in (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    nvcc = tmp / "nvcc"
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(0o755)
    env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_BUDGET_S=str(BUDGET), OUT=str(tmp / "out"),
               GPU_CHECK_SITE=str(tmp / "site"), PYTHON=sys.executable, DSKC_NVCC=str(nvcc))
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=BUDGET + 60)
    wall = time.monotonic() - t0
    out = tmp / "out"
    rows = [dict(zip(["step", "plan", "limit", "took", "rc", "status", "detail"], r.split("\t")))
            for r in (out / "steps.tsv").read_text().splitlines()[1:]]
    return {"proc": proc, "wall": wall, "out": out, "rows": rows}


def test_every_step_runs_in_order_within_the_deadline(dry):
    rows, proc = dry["rows"], dry["proc"]
    assert [r["step"] for r in rows if r["step"] != "cutlass-builds"] == STEPS, proc.stdout[-3000:]
    assert dry["wall"] <= BUDGET + 3, dry["wall"]
    by = {r["step"]: r for r in rows}
    for name in STEPS[:-1]:   # each collects, installs or measures; the last takes what is left of 100 s
        assert by[name]["status"] == "ok", (by[name], proc.stdout[-3000:])
        assert int(by[name]["took"]) <= int(by[name]["limit"]) + 5
    for name in ("stems", "model", "cutlass", "cutlass-bench", "autotune"):   # what the GPU run would run
        assert re.search(r"\d+ tests? collected", by[name]["detail"]), by[name]
    assert by["rest"]["status"] in ("ok", "skipped"), by["rest"]


def test_failed_cutlass_builds_are_recorded_and_fail_the_check(dry):
    builds = next(r for r in dry["rows"] if r["step"] == "cutlass-builds")
    assert builds["status"] == "failed" and "5 failed" in builds["detail"]
    assert dry["proc"].returncode == 1
    summary = (dry["out"] / "summary.md").read_text()
    assert "DRY MODE" in summary and "| cutlass-builds |" in summary
    assert summary.split("\n## ")[0].strip() in dry["proc"].stdout      # the step table ends the call's output


def test_files_fit_what_the_device_returns(dry):
    files = [p.relative_to(dry["out"]) for p in dry["out"].rglob("*") if p.is_file()]
    assert len(files) <= 7 and all(len(f.parts) <= 3 for f in files), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for f in files for part in f.parts)
    assert {"gpu_check.log", "summary.md", "steps.tsv", "env.json", "bench/cpu-smoke/headline.json"} <= \
        {str(f) for f in files}
    env = json.loads((dry["out"] / "env.json").read_text())
    assert env["env"]["device"] == "cpu" and env["ceilings"]["copy"]["value"] > 0


def test_headline_rows_then_the_rest_under_the_time_limit(dry):
    head = schema.load(dry["out"] / "bench" / "cpu-smoke" / "headline.json")
    assert head["suite"] == "headline" and head["mode"] == "cpu-smoke"
    dskc = [r for r in head["results"] if r["impl"] == "dskc-default"]
    assert {r["stem"] for r in dskc} == HEADLINE_STEMS and all(r["status"] == "ok" for r in dskc)
    assert "## headline" in (dry["out"] / "summary.md").read_text()
    rest_file = dry["out"] / "bench" / "cpu-smoke" / "rest.json"
    if not rest_file.exists():   # a slow machine left the last step under its 20-s minimum
        assert next(r for r in dry["rows"] if r["step"] == "rest")["detail"] == "no time left"
        return
    rest = schema.load(rest_file)
    assert not {r["stem"] for r in rest["results"]} & HEADLINE_STEMS
    assert rest["results"] and all(r["status"] in ("ok", "skipped") for r in rest["results"])
    model = [r for r in rest["results"] if r["suite"] == "model" and r["impl"] == "dskc"]   # the rest's first rows
    assert model and all(r["status"] == "ok" or re.search(r"stopped after .* s: time|time .* spent$", r["note"])
                         for r in model), model
