"""`dskc tune` (dskc.autotune.cli.main), model problems, vLLM/SGLang seeds and realistic MoE routing on the CPU."""
import json

import pytest
import torch

import probe_stem
from dskc.autotune import Task, prepare
from dskc.autotune.cli import main
from dskc.autotune.problems import model_problems
from dskc.autotune.routing import expert_rows, gate_topk, recorded_topk, signature
from dskc.autotune.seeds import imported_for, read_vllm_file
from dskc.autotune.space import load_space
from dskc.model import get_config

PROBLEM = json.dumps({"M": 33, "N": 200, "K": 192})


def test_cli_tune_export_plot(tmp_path, capsys):
    db = str(tmp_path / "cli.db")
    common = ["--target", "sm90a", "--kernels", "probe_stem", "--storage", db]
    assert main(common + ["--problem", PROBLEM, "--trials", "6", "--timing", "model", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert "6/6" in err
    row = [line for line in out.splitlines() if line.startswith("probe_dot")]
    assert len(row) == 1 and "M=64,N=200,K=192" in row[0] and " model " in row[0] and "complete=" in row[0]
    assert "ESTIMATES" in out
    assert main(common + ["--problem", PROBLEM, "--trials", "6", "--timing", "model"]) == 0   # resumed: no new trial
    assert "complete=" in capsys.readouterr()[0]
    assert main(common + ["--export", "--out", str(tmp_path / "cfg")]) == 0
    path = tmp_path / "cfg" / "sm90a" / "probe_dot.json"
    assert capsys.readouterr()[0].strip() == str(path)
    assert json.loads(path.read_text())["entries"]["M=64,N=200,K=192"]["meta"]["trials"] == 6
    assert main(common + ["--plot", str(tmp_path / "png")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert len(pngs) == 2 and all(p.endswith(".png") for p in pngs)
    assert all((tmp_path / "png" / p).stat().st_size > 1000 for p in pngs)


@pytest.mark.parametrize("argv, message", [
    (["--target", "sm61", "--problem", PROBLEM], "unsupported target arch"),
    (["--target", "sm90a", "--kernels", "nope", "--problem", PROBLEM], "unknown kernel"),
    (["--target", "sm90a", "--kernels", "probe_stem", "--problem", PROBLEM, "--storage", "bogus://x"],
     "cannot open tuning database"),
    (["--target", "sm90a", "--kernels", "probe_stem"], "give --model NAME or --problem JSON"),
    (["--target", "sm90a", "--kernels", "probe_stem", "--problem", PROBLEM, "--timing", "gpu"], "needs a CUDA GPU"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path):
    if "--storage" not in argv:
        argv = argv + ["--storage", str(tmp_path / "e.db")]
    assert main(argv) == 2
    last = capsys.readouterr()[1].strip().splitlines()[-1]
    assert last.startswith("dskc tune: error:") and message in last


def test_model_problems_are_the_compiled_models_launches():
    v3 = get_config("deepseek-v3")
    # the problems are the compiled model's own launches: the block's stacked [wq_a; wkv_a] GEMM, the head's bf16
    probs = model_problems("fp8_gemm_1d2d", v3, (1, 64))
    assert {"M": 64, "N": 1536 + 576, "K": 7168, "out_dtype": "bf16", "residual": 0} in probs
    assert {(p["N"], p["K"]) for p in probs} >= {(24576, 1536), (7168, 16384), (7168, 18432)}
    assert {"M": 64, "N": 7168, "K": 18432, "out_dtype": "bf16", "residual": 1} in probs   # the dense MLP's w2
    assert {p["M"] for p in probs} == {1, 64}
    grouped = model_problems("grouped_gemm", v3, (16,))
    # 16 tokens x top-8 over 256 experts + the shared one (an always-selected 257th): the masked layout (E * T rows
    # fit), N = moe_inter_dim, SwiGLU + quant, the token rows read through the layout; and the dense MLP's [w1; w3]
    assert {"E": 257, "M": 257 * 16, "N": 2048, "K": 7168, "dtype": "fp8", "layout": "masked",
            "epilogue": "swiglu_quant", "rows_per_id": 1, "out_dtype": "fp8", "stacked_up": 1, "gather": "a"} in grouped
    assert {(p["E"], p["epilogue"], p["rows_per_id"]) for p in grouped} == {(257, "swiglu_quant", 1),
                                                                           (257, "weight", 1), (1, "swiglu_quant", 0)}
    with pytest.raises(ValueError, match="launches no 'nope'"):
        model_problems("nope", v3)


def test_vllm_config_files_become_seeds(tmp_path):
    space = load_space("probe_stem")
    path = tmp_path / "E=16,N=128,device_name=NVIDIA_H200.json"
    path.write_text(json.dumps({
        "1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 4,
              "num_stages": 3},
        "64": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8, "num_warps": 8,
               "num_stages": 2}}))
    table = read_vllm_file(path, space)
    assert table[64] == {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}
    seeds = imported_for(path, space, "sm90a", 50)
    assert seeds[0]["BLOCK_M"] == 64 and seeds[1]["BLOCK_M"] == 16        # nearest M first
    study, _ = prepare(Task("probe_stem", {"M": 50, "N": 64, "K": 64}, "sm90a", str(tmp_path / "s.db"),
                            n_trials=4, imported_seeds=tuple(seeds)))
    labels = [t.user_attrs["seed"] for t in study.get_trials()]
    assert labels == ["default", "known_good[0]", "imported[0]", "imported[1]"]
    path.write_text('{"x": 1}')
    with pytest.raises(ValueError, match="is not 'M'"):
        read_vllm_file(path, space)


def test_realistic_routing_from_the_models_gate(tmp_path):
    args = get_config("tiny")
    hidden = torch.randn(97, args.dim)
    ids = gate_topk(args, hidden, seed=5)
    assert ids.shape == (97, args.n_activated_experts)
    per_group = args.n_routed_experts // args.n_expert_groups
    for row in ids.tolist():                                       # the gate's group limit holds for every token
        assert len(set(row)) == len(row) and len({e // per_group for e in row}) <= args.n_limited_groups
    rows = expert_rows(ids, args.n_routed_experts)
    assert int(rows.sum()) == ids.numel()
    sig = signature(ids, args.n_routed_experts, "gate")
    assert sig == signature(gate_topk(args, hidden, seed=5), args.n_routed_experts, "gate")
    assert sig != signature(torch.randint(0, 16, ids.shape), args.n_routed_experts, "gate")
    torch.save(ids, tmp_path / "ids.pt")
    assert torch.equal(recorded_topk(tmp_path / "ids.pt"), ids)
    torch.save(hidden, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="integer"):
        recorded_topk(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="outside"):
        expert_rows(ids, 3)
