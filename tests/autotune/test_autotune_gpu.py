"""GPU tier: the measured objective (CUDA graphs, L2 flush, median) on a real stem. Skipped without a GPU."""
import optuna
import pytest
import torch

from dskc.autotune import Task, results, open_storage, run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_measured_study_on_fp8_gemm(tmp_path):
    task = Task("fp8_gemm_1d2d", {"M": 64, "N": 2112, "K": 7168}, "sm90a", str(tmp_path / "gpu.db"),
                timing="gpu", n_trials=5, seed=0)
    study = run(task)
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert done, [t.user_attrs.get("reason") for t in study.get_trials()]
    for t in done:
        assert t.user_attrs["timing_mode"] == "cuda-graph" and 1e-7 < t.value < 1e-2
        assert t.user_attrs["cos"] >= 0.999 and "checked" in t.user_attrs["verification"]
    (res,) = results(open_storage(task.storage))
    assert res.key["timing_mode"] == "cuda-graph" and res.gpu == torch.cuda.get_device_name()
