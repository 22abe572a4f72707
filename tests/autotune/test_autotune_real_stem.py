"""A study over a real template's space (fp8_gemm_1d2d, DeepGEMM's M=64 N=2112 K=7168 case) with the MODEL
objective: compile-time pruning of a config that loses the fp8 tensor cores, export, and the compiler's lookup."""
import optuna

from dskc.autotune import Task, export, open_storage, prepare, results, run
from dskc.autotune.space import encode, load_space
from dskc.select import tuned

PROBLEM = {"M": 64, "N": 2112, "K": 7168}


def test_fp8_gemm_study_end_to_end(tmp_path):
    space = load_space("fp8_gemm_1d2d")
    task = Task("fp8_gemm_1d2d", PROBLEM, "sm90a", str(tmp_path / "fp8.db"), n_trials=5, seed=0)   # + 2 below
    study, key = prepare(task)
    assert key.dtype == "fp8e4nv" and dict(key.bucket) == {**PROBLEM, "out_dtype": "bf16", "residual": 0}
    assert key.timing_mode == "model"
    default = dict(space.module.DEFAULTS["sm90"])
    upcast = {**default, "UPCAST": 1, "BLOCK_M": 64, "num_warps": 4, "num_stages": 2}   # decodes to fp16: HGMMA
    study.enqueue_trial(encode(space, upcast), user_attrs={"seed": "upcast"})
    study.enqueue_trial(encode(space, {**default, "SPLIT_K": 8, "BLOCK_N": 256, "num_stages": 5}),
                        user_attrs={"seed": "too-much-smem"})
    study = run(task)
    trials = study.get_trials()
    reasons = {t.user_attrs["seed"]: t.user_attrs.get("reason", "") for t in trials if "seed" in t.user_attrs}
    assert reasons["upcast"].startswith("lost tensor cores") and "QGMMA" in reasons["upcast"]
    assert reasons["too-much-smem"].startswith("constraint: num_stages * (BLOCK_M + BLOCK_N)")
    states = [t.state for t in trials]
    print({s.name: states.count(s) for s in set(states)})
    (res,) = results(open_storage(task.storage))
    assert res.default_s and res.best_s <= res.default_s
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE and "duplicate_of" not in t.user_attrs:
            assert t.user_attrs["kernels"][0]["spill_bytes"] == 0
            assert "QGMMA" in t.user_attrs["kernels"][0]["tensor_core_ops"]
    (path,) = export(open_storage(task.storage), "sm90a", root=tmp_path)
    problem = {"M": 50, "N": 2112, "K": 7168, "out_dtype": "bf16", "residual": 0}
    config, source = tuned.lookup("fp8_gemm_1d2d", "sm90a", problem, root=tmp_path)
    assert config == res.best_config and source == f"tuned:{path}"
