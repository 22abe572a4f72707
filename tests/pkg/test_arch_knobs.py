import importlib.metadata as md
import subprocess
import sys

import pytest

from dskc import arch, knobs


@pytest.mark.parametrize("name,expect", [("sm90a", "sm90a"), ("sm_90a", "sm90a"), ("90", "sm90a"), ("H200", "sm90a"),
                                         ("sm100a", "sm100a"), ("sm80", "sm80")])
def test_parse(name, expect):
    assert arch.parse(name).name == expect


@pytest.mark.parametrize("bad", ["sm75", "volta", "sm_12x", ""])
def test_unknown_arch_is_clear(bad):
    with pytest.raises(ValueError, match="arch"):
        arch.parse(bad)


def test_auto_without_gpu_is_clear():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: 'auto' resolves")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        arch.parse("auto")


def test_knobs_scope_restores(tmp_path):
    before = knobs.get().cache_dir
    with knobs.scope(cache_dir=tmp_path):
        assert knobs.get().cache_dir == tmp_path
    assert knobs.get().cache_dir == before


def test_install_names_live_under_one_roof(tmp_path):
    # Run from an empty folder so the checkout itself is not on sys.path: only what the install provides counts.
    code = ("import importlib.util as u; "
            "print([n for n in ('dskc', 'dskc.templates', 'dskc.autotune', 'dskc.model', 'dskc.templates.triton') "
            "if u.find_spec(n) is None]); "
            "print([n for n in ('model', 'autotune', 'templates') if u.find_spec(n) is not None])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    missing, strays = out.stdout.splitlines()
    assert missing == "[]", f"not importable: {missing}"
    assert strays == "[]", f"top-level modules leak from the install: {strays}"


def test_entry_points_registered():
    eps = md.entry_points()
    assert any(e.name == "dskc" for e in eps.select(group="torch_dynamo_backends"))
    assert any(e.name == "dskc" for e in eps.select(group="console_scripts"))
