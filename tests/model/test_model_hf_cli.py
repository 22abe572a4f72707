"""A Hugging Face checkpoint folder through the command line and the top-level API: `dskc explain|compile|run
--model FOLDER`, `dskc run --from DIR` (the weights and tokenizer of the folder DIR was compiled from), prompts as
text through tokenizer.json or as token ids, `dskc.compile` at the top level and its refusal of float32 models."""
import argparse
import json
import re

import pytest
import torch

import dskc
import hf_models as hf
from dskc import cli
from dskc.model import Transformer, get_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The `tiny` config's shapes (so its kernels come from the build cache), 2 layers, as DeepSeek publishes V3:
    FP8 weights with weight_scale_inv in shards, plus a tokenizer.json."""
    path = tmp_path_factory.mktemp("hf-tiny")
    hf.save(hf.build("tiny-like"), path, sharded=True, fp8=True)
    hf.save_tokenizer(path, ["hello", "world", "the", "cat"], vocab_size=256)
    return path


def test_compile_then_run_from_dir_with_a_text_prompt(folder, tmp_path, capsys):
    out = tmp_path / "aot"
    assert cli.main(["compile", "--model", str(folder), "--target", "sm90a", "--out", str(out),
                     "--max-seq-len", "64", "--max-batch-size", "2"]) == 0
    assert "fallbacks: 0" in capsys.readouterr().out
    shipped = json.loads((out / "manifest.json").read_text())["model"]
    assert (shipped["n_layers"], shipped["dtype"], shipped["max_seq_len"], shipped["gate_bias"]) == (2, "fp8", 64, True)
    assert json.loads((out / cli.SOURCE).read_text())["checkpoint"] == str(folder.resolve())
    assert cli.main(["run", "--from", str(out), "--prompt", "hello world the cat", "--new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    assert f"checkpoint {folder.resolve()}" in text and f"loaded from {out}" in text and "fallbacks: 0" in text
    m = re.search(r"prompt 0 \(4 tokens\) -> \[(\d+), (\d+)\] '(w?\w+) (w?\w+)'", text)   # decoded by tokenizer.json
    assert m, text


def test_explain_reads_the_folder(folder, capsys):
    assert cli.main(["explain", "--model", str(folder), "--target", "sm90a", "--table-only", "--no-build"]) == 0
    text = capsys.readouterr().out
    assert "moe_route" in text and "mla_decode" in text and "layers.1.ffn" in text


def test_run_argument_errors(folder, tmp_path, capsys):
    assert cli.main(["run", "--model", str(folder), "--checkpoint", str(folder)]) == 2
    assert "drop --checkpoint" in capsys.readouterr().err
    out = tmp_path / "aot"
    assert cli.main(["compile", "--model", "tiny", "--target", "sm90a", "--out", str(out)]) == 0
    (out / cli.SOURCE).write_text(json.dumps({"checkpoint": str(tmp_path / "gone")}))
    assert cli.main(["run", "--from", str(out)]) == 2
    assert "which is not here: give the weights with --checkpoint" in capsys.readouterr().err
    assert cli.main(["run", "--from", str(out), "--max-seq-len", "32"]) == 2
    assert "drop --max-seq-len" in capsys.readouterr().err


def _prompt_args(**kw):
    return argparse.Namespace(**{"prompt": None, "prompt_lens": [3], "seed": 0, **kw})


def test_prompts_text_ids_and_random(folder, tmp_path):
    cfg = get_config("tiny")
    prompts, decode = cli._prompts(_prompt_args(prompt=["hello cat", "the"]), cfg, str(folder))
    assert prompts == [[1, 4], [3]] and decode([5, 6]) == "w5 w6"
    assert cli._prompts(_prompt_args(prompt=["1 2 3", "4,5"]), cfg, None) == ([[1, 2, 3], [4, 5]], None)
    assert cli._prompts(_prompt_args(prompt=["7 8"]), cfg, str(tmp_path))[0] == [[7, 8]]   # no tokenizer.json
    with pytest.raises(ValueError, match="has no tokenizer.json, so prompts are token ids"):
        cli._prompts(_prompt_args(prompt=["hello"]), cfg, str(tmp_path))
    prompts, decode = cli._prompts(_prompt_args(), cfg, None)
    assert len(prompts) == 1 and len(prompts[0]) == 3 and decode is None


def test_model_args_of_a_folder_and_overrides(folder):
    a = cli._model_args(str(folder), argparse.Namespace(max_seq_len=96, max_batch_size=3, quantize=None))
    assert (a.max_seq_len, a.max_batch_size, a.n_layers, a.dtype, a.yarn) == (96, 3, 2, "fp8", True)
    t = cli._model_args("tiny", argparse.Namespace(max_seq_len=None, max_batch_size=None, quantize=None))
    assert t == get_config("tiny")


def test_top_level_compile_and_float32_refusal():
    from dskc import compiler
    assert dskc.compile is compiler.compile and dskc.load is compiler.load
    model = Transformer(get_config("tiny", n_layers=1), dtype=torch.float32, device="meta")
    with pytest.raises(ValueError, match=r"computes in torch.float32.*bfloat16 or float16.*dtype=torch.bfloat16"):
        dskc.compile(model, target="sm90a")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dskc.nope
