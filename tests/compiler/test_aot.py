"""`dskc compile --out DIR`: cubins + manifest for an absent GPU, verified by hash."""

import pytest

from dskc import cli
from dskc.build import aot


def test_compile_tiny_for_sm90a_writes_cubins_and_manifest(tmp_path, capsys):
    out = tmp_path / "tiny-sm90a"
    assert cli.main(["compile", "--model", "tiny", "--target", "sm90a", "--out", str(out), "--tokens", "1,16,128"]) == 0
    manifest = aot.verify(out)
    assert manifest["target"] == "sm90a" and manifest["fallbacks"] == [] and manifest["tokens"] == [1, 16, 128]
    assert {r["tokens"] for r in manifest["regions"]} == {1, 16, 128}
    launches = [(k["launch"]["function"], tuple(sorted(k["launch"]["constexprs"].items())), k["launch"]["num_warps"],
                 k["launch"]["num_stages"]) for k in manifest["kernels"]]
    assert len(launches) == len(set(launches))            # each distinct kernel shipped once
    stems = {k["stem"] for k in manifest["kernels"]}
    assert {"fp8_gemm_1d2d", "grouped_gemm", "mla_decode", "moe_route", "act_quant"} <= stems
    assert all((out / k["file"]).stat().st_size > 0 and k["spill_bytes"] == 0 for k in manifest["kernels"])
    assert any("QGMMA" in k["tensor_core_ops"] for k in manifest["kernels"])
    printed = capsys.readouterr().out
    assert "fallbacks: 0" in printed and "token buckets [1, 16, 128]" in printed
    # a cubin edited after the build is caught
    victim = out / manifest["kernels"][0]["file"]
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="hash"):
        aot.verify(out)


def test_compile_cli_bad_target_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["compile", "--model", "tiny", "--target", "sm75", "--out", str(tmp_path)]) == 2
    assert "unsupported target arch" in capsys.readouterr().err
    assert cli.main(["compile", "--model", "tiny", "--target", "sm120", "--out", str(tmp_path)]) == 2
    assert "sm_120 (consumer Blackwell)" in capsys.readouterr().err
    assert cli.main(["compile", "--model", "tiny", "--target", "sm90a", "--out", str(tmp_path), "--tokens", "0,4"]) == 2
    assert "positive token counts" in capsys.readouterr().err
    assert not (tmp_path / "manifest.json").exists()
