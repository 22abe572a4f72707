"""GPU tier: a short `dskc bench --suite gemm` and `--suite mla` (time budget, torch.compile off) on the real GPU:
files written under <out>/<gpu slug>/, schema-valid, dskc rows measured next to the eager baselines and the
ceilings of the same run. The full suites run from bench/gpu_check.sh."""
from __future__ import annotations

import pytest
import torch

from dskc.benchmark import cli, measure, schema

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("suite, baseline", [("gemm", "torch-bf16"), ("mla", "torch-sdpa")])
def test_short_gpu_suite(tmp_path, suite, baseline):
    rc = cli.main(["--suite", suite, "--out", str(tmp_path), "--budget-s", "15", "--torch-compile", "off",
                   "--quiet"])
    assert rc == 0
    folder = tmp_path / measure.gpu_slug(torch.cuda.get_device_name())
    doc = schema.load(folder / f"{suite}.json")
    assert (folder / f"{suite}.png").stat().st_size > 10_000 and (folder / f"{suite}.md").stat().st_size > 0
    assert doc["mode"] == "gpu" and doc["env"]["gpu"] == torch.cuda.get_device_name()
    ce = doc["ceilings"]
    assert ce["bf16_matmul"]["value"] > 10 and ce["copy"]["value"] > 100   # TFLOP/s, GB/s on any recent GPU
    first = doc["results"][0]["case"]
    rows = {r["impl"]: r for r in doc["results"] if r["case"] == first}
    assert rows["dskc-default"]["status"] == "ok", rows["dskc-default"]["note"]
    assert rows[baseline]["status"] == "ok", rows[baseline]["note"]
    fig = rows["dskc-default"][rows["dskc-default"]["primary"]]
    assert fig > 0 and rows["dskc-default"]["pct_compute"] > 0
