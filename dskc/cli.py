"""The `dskc` command line: demo, report, tune (and, as they land, compile / run / explain / bench)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from dskc import knobs


def _demo(args) -> int:
    """The README's main job: the tiny model's prefill + greedy decode, naive vs absorbed attention."""
    import torch

    from dskc.model import Transformer, generate, get_config, init_random, kv_cache_bytes_per_token

    cfg = get_config(args.model)
    torch.manual_seed(args.seed)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in args.prompt_lens]
    print(f"dskc demo: model {args.model!r} ({cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_routed_experts} routed "
          f"experts, weights {cfg.dtype}), {len(prompts)} prompts of {args.prompt_lens} tokens, "
          f"{args.new_tokens} new tokens each, greedy, on the CPU (eager PyTorch)")
    rows, outputs = [], {}
    for impl in ("naive", "absorb"):
        model = Transformer(cfg, attn_impl=impl)
        init_random(model, seed=args.seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(torch.tensor([prompts[0]]), start_pos=0)  # warm-up
            t1 = time.perf_counter()
            out = generate(model, prompts, max_new_tokens=args.new_tokens)
        dt = time.perf_counter() - t1
        new = sum(len(o) for o in out)
        outputs[impl] = out
        rows.append((impl, new / dt, kv_cache_bytes_per_token(cfg, impl), t1 - t0))
    print(f"{'attention':<10} {'tokens/s':>10} {'KV-cache bytes/token':>22}")
    for impl, tps, kvb, _ in rows:
        print(f"{impl:<10} {tps:>10.1f} {kvb:>22,}")
    ratio = rows[1][2] / rows[0][2]
    same = outputs["naive"] == outputs["absorb"]
    print(f"absorbed cache is {ratio:.2%} of naive; greedy tokens naive == absorb: {same}")
    print("first prompt's new tokens:", outputs["absorb"][0])
    return 0


def _report(args) -> int:
    from dskc.build.report import kernel_report

    problem = json.loads(args.problem)
    config = json.loads(args.config) if args.config else None
    for r in kernel_report(args.stem, problem, args.target, config):
        print(json.dumps(r.as_dict()))
    return 0


def _tune(args, rest) -> int:
    from dskc.autotune.cli import main as tune_main

    return tune_main(rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dskc", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the tiny model's prefill + greedy decode (naive vs absorbed MLA)")
    d.add_argument("--model", default="tiny")
    d.add_argument("--prompt-lens", type=int, nargs="+", default=[12, 7, 20])
    d.add_argument("--new-tokens", type=int, default=16)
    d.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report", help="cross-compile a kernel stem and print registers/shared/spills/tensor cores")
    r.add_argument("stem")
    r.add_argument("--problem", required=True, help='JSON, e.g. \'{"M": 128, "N": 4096, "K": 7168}\'')
    r.add_argument("--config", help="JSON config (default: the arch's default)")
    r.add_argument("--target", default="sm90a")
    sub.add_parser("tune", help="autotune kernels with Optuna (see `dskc tune --help`)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=knobs.get().log_level, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "tune":
        return _tune(None, argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"demo": _demo, "report": _report}[args.cmd](args)
    except (ValueError, KeyError, RuntimeError) as exc:
        print(f"dskc {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
