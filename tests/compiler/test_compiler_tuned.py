"""A model-mode Optuna study on a real template, exported, then used by the compiler's selection."""
import pytest

from dskc import compiler, knobs
from dskc.autotune import Task, export, run
from dskc.model import Transformer, get_config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned")
    tiny = get_config("tiny")
    problem = {"M": 64, "N": tiny.dim, "K": tiny.n_heads * tiny.v_head_dim}   # tiny's wo at the selection's hint
    task = Task("fp8_gemm_1d2d", problem, "sm90a", f"sqlite:///{root / 'optuna.db'}", n_trials=6, seed=0)
    with knobs.scope(cache_dir=knobs.get().cache_dir):
        run(task)
        paths = export(task.storage, "sm90a", stems=["fp8_gemm_1d2d"], root=root / "configs")
    return root / "configs", paths


def test_compiler_uses_the_export_and_explain_says_so(exported):
    root, paths = exported
    assert [p.name for p in paths] == ["fp8_gemm_1d2d.json"]
    model = Transformer(get_config("tiny"), device="meta")
    default = compiler.plan(model, "sm90a")
    with knobs.scope(tuned_dir=root):
        tuned = compiler.plan(model, "sm90a")
    wo = [c for c in tuned.choices if c.region == "layers.0.attn.wo" and c.stem == "fp8_gemm_1d2d"][0]
    assert wo.source == f"tuned:{paths[0]}"
    # other stems (no export) keep their defaults; the explain table names the source of every config
    assert all(c.source == "default:sm90" for c in tuned.choices if c.stem != "fp8_gemm_1d2d")
    from dskc.explain import kernel_table
    assert "tuned:" in kernel_table(tuned) and "tuned:" not in kernel_table(default)
