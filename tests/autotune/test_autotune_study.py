"""The autotuner end to end on the CPU with the MODEL objective: seeds, compile-time pruning, export, lookup."""
import json
import logging

import optuna
import pytest

import probe_stem
from dskc.autotune import Task, export, open_storage, prepare, results, run
from dskc.autotune.space import bucket, decode, encode, feasible_configs, load_space, violated
from dskc.autotune.storage import StorageError
from dskc.select import tuned

PROBLEM = {"M": 200, "N": 300, "K": 256}


def _task(tmp_path, **kw):
    # sm80: probe_stem.SPILLING spills there with triton 3.6 and 3.9 alike (sm_90a: with 3.9 only)
    base = dict(stem="probe_stem", problem=PROBLEM, arch="sm80", storage=str(tmp_path / "t.db"), n_trials=14,
                seed=0, imported_seeds=(probe_stem.SPILLING,))
    base.update(kw)
    return Task(**base)


def test_space_buckets_and_encoding():
    space = load_space("probe_stem")
    assert bucket(space, PROBLEM) == {"M": 256, "N": 300, "K": 256}
    assert bucket(space, {"M": 1, "N": 7, "K": 3}) == {"M": 1, "N": 7, "K": 3}
    cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    assert decode(space, encode(space, cfg)) == cfg
    assert encode(space, cfg)["BLOCK_M"] == 2      # ordinal: suggested by index
    assert violated(space, {**cfg, "BLOCK_N": 128}, PROBLEM) == "BLOCK_M * BLOCK_N * BLOCK_K <= 262144"
    assert len(feasible_configs(space, PROBLEM)) == 72 - 4
    with pytest.raises(ValueError, match="lacks"):
        bucket(space, {"M": 3})
    with pytest.raises(ValueError, match="not in the space"):
        encode(space, {**cfg, "BLOCK_M": 48})


def test_study_prunes_at_compile_time_exports_and_compiler_reads(tmp_path, caplog):
    task = _task(tmp_path, n_trials=13)
    study, key = prepare(task)
    bad = encode(load_space("probe_stem"), {**probe_stem.SPILLING, "BLOCK_M": 64})   # breaks the constraint
    study.enqueue_trial(bad, user_attrs={"seed": "test-infeasible"})   # 13 planned + this one: 14 trials run
    study = run(task)
    trials = study.get_trials()
    assert len(trials) == 14 and trials[0].user_attrs["seed"] == "default"
    reasons = [t.user_attrs.get("reason", "") for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    by_constraint = [r for r in reasons if r.startswith("constraint:")]
    by_compiler = [r for r in reasons if r.startswith("spills:")]
    print(f"pruned: {len(by_constraint)} by constraints (not compiled), {len(by_compiler)} by the compiler")
    assert len(by_constraint) >= 1 and len(by_compiler) >= 1
    for t in trials:
        if t.user_attrs.get("reason", "").startswith("constraint:"):
            assert "kernels" not in t.user_attrs       # nothing was compiled for it
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(t.user_attrs["timing_mode"] == "model" for t in done)
    assert all("not run" in t.user_attrs["verification"] for t in done)
    best = min(done, key=lambda t: t.value)
    (res,) = results(open_storage(task.storage))
    assert res.best_config == best.user_attrs["config"] and res.default_s >= res.best_s > 0

    (path,) = export(open_storage(task.storage), "sm80", root=tmp_path / "configs")
    assert path == tmp_path / "configs" / "sm80" / "probe_dot.json"
    doc = json.loads(path.read_text())
    entry = doc["entries"]["M=256,N=300,K=256"]
    assert entry["meta"]["timing_mode"] == "model" and entry["meta"]["toolchain"]["triton"]
    config, source = tuned.lookup("probe_dot", "sm80", {"M": 130, "N": 300, "K": 256}, root=tmp_path / "configs")
    assert config == best.user_attrs["config"] and source == f"tuned:{path}"
    assert tuned.lookup("probe_dot", "sm80", {"M": 130, "N": 301, "K": 256}, root=tmp_path / "configs")[0] is None
    assert tuned.lookup("probe_dot", "sm100a", PROBLEM, root=tmp_path / "configs") == \
        (None, f"untuned: no file {tmp_path / 'configs' / 'sm100a' / 'probe_dot.json'}")

    # a stale entry (another Triton) is reported and ignored
    entry["meta"]["toolchain"]["triton"] = "0.0.1"
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="dskc.select"):
        config, source = tuned.lookup("probe_dot", "sm80", PROBLEM, root=tmp_path / "configs")
    assert config is None and source.startswith("untuned:")
    assert "tuned with triton 0.0.1" in caplog.text

    # a corrupt export file: clear errors from the reader and the exporter; the database keeps every trial
    path.write_text("{not json")
    with pytest.raises(tuned.TunedFileError, match="probe_dot.json"):
        tuned.lookup("probe_dot", "sm80", PROBLEM, root=tmp_path / "configs")
    with pytest.raises(tuned.TunedFileError, match="cannot be read"):
        export(open_storage(task.storage), "sm80", root=tmp_path / "configs")
    assert path.read_text() == "{not json"
    assert len(optuna.load_study(study_name=key.study_name, storage=open_storage(task.storage)).trials) == 14


def test_bad_inputs(tmp_path):
    with pytest.raises(KeyError, match="unknown kernel stem 'no_such_kernel'"):
        prepare(_task(tmp_path, stem="no_such_kernel"))
    with pytest.raises(ValueError, match="unknown target arch"):
        prepare(_task(tmp_path, arch="sm61x"))
    with pytest.raises(ValueError, match="no config of the space meets its constraints"):
        prepare(_task(tmp_path, problem={"M": 4, "N": 4, "K": 16}, imported_seeds=()))
    with pytest.raises(StorageError, match="cannot open tuning database"):
        open_storage("nosuchdialect://user@host/db")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot create the folder"):
        open_storage(str(blocker / "sub" / "t.db"))
    with pytest.raises(ValueError, match="unknown sampler"):
        prepare(_task(tmp_path, sampler="annealing"))


def test_compile_check_prunes_shared_memory_and_lost_tensor_cores(monkeypatch):
    import dataclasses as dc

    from dskc.autotune import objective
    from dskc.autotune.hardware import hardware
    space = load_space("probe_stem")
    cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}   # 8192 B, HGMMA
    reports, reason = objective.compile_check(space, PROBLEM, cfg, "sm90a", None)
    assert reason is None and reports[0].shared_bytes == 8192 and "HGMMA" in reports[0].tensor_core_ops
    _, reason = objective.compile_check(space, PROBLEM, cfg, "sm90a", (("QGMMA",),))
    assert reason.startswith("lost tensor cores")                      # fp8 default, 16-bit config
    _, reason = objective.compile_check(space, PROBLEM, cfg, "sm90a", (("HMMA",),))
    assert reason is None                                              # mma.sync and wgmma rank alike
    small = dc.replace(hardware("sm90a"), smem_per_block=4096)
    monkeypatch.setattr(objective, "hardware", lambda arch: small)
    _, reason = objective.compile_check(space, PROBLEM, cfg, "sm90a", None)
    assert reason == "shared: 8192 B > 4096 B in probe_dot_kernel[BK=32,BM=64,BN=32;w8s2]"


def test_roofline_terms_by_hand():
    from types import SimpleNamespace

    from dskc.autotune.hardware import hardware
    from dskc.autotune.roofline import blocks_per_sm, estimate, grid_and_padding
    space = load_space("probe_stem")
    cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}
    grid, padding = grid_and_padding(space, {"M": 100, "N": 70, "K": 64}, cfg)
    assert grid == 2 * 3 and padding == pytest.approx((128 * 96) / (100 * 70))
    rep = SimpleNamespace(registers=128, shared_bytes=65536, tensor_core_ops=("HGMMA",))
    hw = hardware("sm90a")
    assert blocks_per_sm(rep, 8, hw) == 2                              # 65536 regs / (128 * 256); smem allows 3
    big = {"M": 64 * 132 * 2, "N": 32, "K": 8192}                     # exactly 2 blocks on every SM: one wave
    terms = estimate(space, big, cfg, [rep], hw)
    assert terms["waves"] == 1 and terms["wave_eff"] == 1.0 and terms["padding"] == 1.0
    flops = 2.0 * big["M"] * 32 * 8192
    assert terms["compute_s"] == pytest.approx(flops / (hw.peak_16bit * (64 * 32 / 128 ** 2) ** 0.5))
    assert terms["time_s"] >= max(terms["compute_s"], terms["memory_s"])
    fp32 = estimate(space, big, cfg, [SimpleNamespace(registers=128, shared_bytes=65536, tensor_core_ops=())], hw)
    assert fp32["compute_s"] == pytest.approx(terms["compute_s"] * hw.peak_16bit / hw.peak_fp32)


def test_lookup_takes_the_nearest_bucket_and_checks_constraints(tmp_path):
    from dskc.select.tuned import current_toolchain
    tools = current_toolchain()
    cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "SPLIT_K": 1, "UPCAST": 0,
           "num_warps": 8, "num_stages": 3}
    def entry(m, **over):
        return {"bucket": {"M": m, "N": 7168, "K": 2048}, "config": {**cfg, **over},
                "meta": {"toolchain": tools, "timing_mode": "model", "gpu": "none (model)", "date": "2026-11-23"}}
    doc = {"format": 1, "stem": "fp8_gemm_1d2d", "arch": "sm90a", "buckets": {"M": "pow2", "N": "exact",
                                                                               "K": "exact"},
           "entries": {"a": entry(16, BLOCK_M=16), "b": entry(256, BLOCK_M=128), "c": entry(64, SPLIT_K=32)}}
    path = tmp_path / "sm90a" / "fp8_gemm_1d2d.json"
    path.parent.mkdir()
    path.write_text(json.dumps(doc))
    look = lambda m: tuned.lookup("fp8_gemm_1d2d", "sm90a", {"M": m, "N": 7168, "K": 2048}, root=tmp_path)  # noqa
    assert look(40)[0]["BLOCK_M"] == 16          # log2 distance 1.3 to 16, 2.7 to 256; "c" breaks SPLIT_K <= K/128
    assert look(200)[0]["BLOCK_M"] == 128 and look(200)[1] == f"tuned:{path}"
    assert look(1)[0]["BLOCK_M"] == 16
    doc["entries"]["a"]["bucket"] = {"M": 16}
    path.write_text(json.dumps(doc))
    with pytest.raises(tuned.TunedFileError, match="bucket fields differ"):
        look(40)
