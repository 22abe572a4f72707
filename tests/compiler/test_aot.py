"""`dskc compile --out DIR`: cubins + manifest for an absent GPU, verified by hash."""

import pytest

from dskc import cli
from dskc.build import aot


def test_compile_tiny_for_sm90a_writes_cubins_and_manifest(tmp_path, capsys):
    out = tmp_path / "tiny-sm90a"
    assert cli.main(["compile", "--model", "tiny", "--target", "sm90a", "--out", str(out)]) == 0
    manifest = aot.verify(out)
    assert manifest["target"] == "sm90a" and manifest["fallbacks"] == []
    stems = {k["stem"] for k in manifest["kernels"]}
    assert {"fp8_gemm_1d2d", "grouped_gemm", "mla_decode", "moe_route", "act_quant"} <= stems
    assert all((out / k["file"]).stat().st_size > 0 and k["spill_bytes"] == 0 for k in manifest["kernels"])
    assert any("QGMMA" in k["tensor_core_ops"] for k in manifest["kernels"])
    assert "fallbacks: 0" in capsys.readouterr().out
    # a cubin edited after the build is caught
    victim = out / manifest["kernels"][0]["file"]
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="hash"):
        aot.verify(out)


def test_compile_cli_bad_target_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["compile", "--model", "tiny", "--target", "sm75", "--out", str(tmp_path)]) == 2
    assert "unsupported target arch" in capsys.readouterr().err
    assert not (tmp_path / "manifest.json").exists()
