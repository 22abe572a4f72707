"""The `dskc` command line: demo, compile, run, explain, report, tune, bench."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from dskc import knobs


def _timed_generate(model, prompts, new_tokens):
    from dskc.demo import timed_generate

    return timed_generate(model, prompts, new_tokens)


def _demo(args) -> int:
    """The README's main job (dskc.demo): the trained tiny-text model by default, --random for random weights."""
    from dskc.demo import run

    return run(args)


def _model_args(spec: str, opts=None):
    """ModelArgs for --model: a named config, a config .json, or a Hugging Face checkpoint folder (config.json read
    field by field); --max-seq-len / --max-batch-size / --quantize from `opts` override (the KV cache, FP8)."""
    import dataclasses

    from dskc.model import ModelArgs, get_config
    from dskc.model.hf import args_from_hf_config, is_hf_folder, read_config

    sizes = {k: getattr(opts, k) for k in ("max_seq_len", "max_batch_size") if getattr(opts, k, None) is not None}
    quantize = getattr(opts, "quantize", None)
    if is_hf_folder(spec):
        return args_from_hf_config(read_config(spec), quantize=quantize, **sizes)
    cfg = ModelArgs.from_json(spec) if spec.endswith(".json") else get_config(spec)
    return dataclasses.replace(cfg, **sizes, **({"dtype": "fp8"} if quantize == "fp8" else {}))


def _plan(args, build: bool):
    from dskc import compiler
    from dskc.model import Transformer

    cfg = _model_args(args.model, args)
    model = Transformer(cfg, device="meta")     # shapes only: nothing is allocated, no GPU needed
    t0 = time.perf_counter()
    p = compiler.plan(model, args.target, capture=args.capture, tokens=_tokens(args))
    if build:
        compiler.build(p)
    return cfg, p, time.perf_counter() - t0


SOURCE = "source.json"   # in a `dskc compile --out` DIR built from a checkpoint folder: where its weights are


def _tokens(args):
    """--tokens 1,16,128,4096 as a tuple (None: the plan's default buckets)."""
    raw = getattr(args, "tokens", None)
    if not raw:
        return None
    try:
        counts = tuple(int(t) for t in raw.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--tokens takes comma-separated token counts, e.g. 1,16,128,4096; got {raw!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--tokens takes positive token counts, got {raw!r}")
    return counts


def _compile(args) -> int:
    """Ahead-of-time: every kernel of the model for the target, plus a manifest, into --out."""
    from pathlib import Path

    from dskc.build import aot
    from dskc.build.triton_xc import build_count
    from dskc.model.hf import is_hf_folder

    cfg, p, dt = _plan(args, build=True)
    path = aot.write(p, args.out, aot.config_dict(cfg))
    if is_hf_folder(args.model):   # `dskc run --from DIR` loads these weights (and tokenizer)
        (Path(args.out) / SOURCE).write_text(json.dumps({"checkpoint": str(Path(args.model).resolve())}) + "\n")
    n = len(p.specs)
    print(f"compiled {args.model} for {p.target}: token buckets {list(p.tokens)}, {len(p.choices)} region kernels, "
          f"{n} cubins ({build_count()} built now, the rest from the cache) in {dt:.1f} s -> {path}")
    print(f"fallbacks: {len(p.fallbacks)}" + "".join(f"\n  {r}: {why}" for r, why in p.fallbacks))
    return 0


def _source(args):
    """(ModelArgs, weights folder or None) of a run: --from DIR's manifest (weights: --checkpoint, else the folder
    DIR was compiled from), or --model (a checkpoint folder holds its weights; else --checkpoint or random)."""
    from pathlib import Path

    from dskc.model import ModelArgs
    from dskc.model.hf import is_hf_folder

    if not args.from_dir:
        spec = args.model or "tiny"
        if is_hf_folder(spec) and args.checkpoint:
            raise ValueError(f"--model {spec} is a checkpoint folder with its own weights: drop --checkpoint")
        return _model_args(spec, args), args.checkpoint or (spec if is_hf_folder(spec) else None), None
    from dskc.build import aot
    manifest = aot.verify(args.from_dir)
    shipped = manifest.get("model") or {}
    if args.model:
        raise ValueError("--model and --from both name the model: give one (--from DIR holds its config)")
    if args.max_seq_len or args.max_batch_size or args.quantize:
        raise ValueError("--from DIR fixes the model config it was compiled for: drop --max-seq-len, "
                         "--max-batch-size and --quantize")
    if not shipped:
        raise ValueError(f"{args.from_dir}'s manifest has no model config: run it with --model")
    weights = args.checkpoint
    source = Path(args.from_dir) / SOURCE
    if weights is None and source.is_file():
        weights = json.loads(source.read_text())["checkpoint"]
        if not Path(weights).is_dir():
            raise ValueError(f"{args.from_dir} was compiled from {weights}, which is not here: give the weights "
                             "with --checkpoint")
    return ModelArgs(**shipped), weights, manifest


def _build_model(cfg, weights, seed: int, device):
    """The Transformer of a run: built on the meta device and loaded tensor by tensor from `weights` (a float
    checkpoint folder for an FP8 config is quantised on load), else random (seeded)."""
    from dskc.model import Transformer, init_random, load_checkpoint
    from dskc.model.hf import is_hf_folder, read_config

    if weights is None:
        model = Transformer(cfg, device=device)
        return init_random(model, seed=seed), f"random weights (seed {seed})"
    quantize = cfg.dtype == "fp8" and is_hf_folder(weights) and read_config(weights).get("quantization_config") is None
    model = load_checkpoint(Transformer(cfg, device="meta"), weights, quantize=quantize, device=device)
    return model, f"checkpoint {weights}" + (" (quantised to FP8 on load)" if quantize else "")


def _prompts(args, cfg, weights):
    """Token-id prompts and a decoder: --prompt texts through the checkpoint's tokenizer.json (the `tokenizers`
    package, offline), or --prompt token ids when there is none; else random prompts of --prompt-lens."""
    from pathlib import Path

    import torch

    tok_file = Path(weights) / "tokenizer.json" if weights else None
    if tok_file is not None and tok_file.is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_file))
        if args.prompt:
            return [tok.encode(p).ids for p in args.prompt], tok.decode
    if args.prompt:
        try:
            return [[int(t) for t in p.replace(",", " ").split()] for p in args.prompt], None
        except ValueError:
            where = f"{weights} has no tokenizer.json" if weights else "no checkpoint folder gives a tokenizer.json"
            raise ValueError(f"--prompt {args.prompt[0]!r}: {where}, so prompts are token ids ('1 2 3')") from None
    torch.manual_seed(args.seed)
    return [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in args.prompt_lens], None


def _run(args) -> int:
    """Prompts through a model on generated kernels: compiled here for --target, or loaded from a `dskc compile
    --out` DIR (--from). Weights from a checkpoint folder (--model FOLDER, --checkpoint, or the folder --from DIR
    was compiled from), else random (seeded)."""
    import torch

    from dskc import compiler
    from dskc.model.hf import is_hf_folder, read_config

    cfg, weights, manifest = _source(args)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)   # small matmuls on a shared CPU run faster on one thread
    device = "cuda" if torch.cuda.is_available() else None
    prompts, decode = _prompts(args, cfg, weights)   # before the weights: a bad prompt fails fast
    model, what = _build_model(cfg, weights, args.seed, device)
    t0 = time.perf_counter()
    if args.from_dir:
        compiled = compiler.load(model, args.from_dir, inplace=True, manifest=manifest)
        how = f"loaded from {args.from_dir} ({compiled.aot.reason})"
    else:
        compiled = compiler.compile(model, args.target, inplace=True)
        how = f"compiled for {compiled.plan.target}"
    print(f"dskc run: {cfg.n_layers} layers, dim {cfg.dim}, {what}; kernels {how} in "
          f"{time.perf_counter() - t0:.1f} s; fallbacks: {len(compiled.plan.fallbacks)}"
          + "".join(f"\n  {r}: {why}" for r, why in compiled.plan.fallbacks))
    eos = read_config(weights).get("eos_token_id") if weights and is_hf_folder(weights) else None
    out, tps = _generate(compiled.module, prompts, args.new_tokens, eos if isinstance(eos, int) else None)
    for i, toks in enumerate(out):
        print(f"prompt {i} ({len(prompts[i])} tokens) -> {toks}" + (f" {decode(toks)!r}" if decode else ""))
    where = "GPU" if torch.cuda.is_available() else "CPU, Triton interpreter: not kernel performance"
    print(f"{sum(len(o) for o in out)} new tokens, {tps:.2f} tokens/s ({where})")
    stats = getattr(getattr(compiled, "aot", None), "stats", None)
    if stats is not None and torch.cuda.is_available():
        print(f"kernels from {args.from_dir}: {stats.served} served, {stats.compiled} compiled here"
              + "".join(f"\n  {fn}: {why}" for fn, why in stats.misses[:20]))
    return 0


def _generate(model, prompts, new_tokens, eos):
    import torch

    from dskc.model import generate

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = generate(model, prompts, max_new_tokens=new_tokens, eos_id=eos)
    return out, max(sum(len(o) for o in out), 1) / (time.perf_counter() - t0)


def _explain(args) -> int:
    from dskc.explain import render

    _, p, _ = _plan(args, build=not args.no_build)
    print(render(p, passes=not args.table_only))
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


CAPTURE_HELP = ("how regions are found: module = by structure in the module tree (fast); dynamo = from Dynamo's FX "
                "graphs of a prefill and a decode step (fullgraph; ~10 s for tiny, minutes for deepseek-v2-lite)")


MODEL_HELP = ("a named config (tiny, deepseek-v2-lite, ...), a config .json, or a Hugging Face DeepSeek checkpoint "
              "folder (config.json + safetensors)")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-seq-len", type=int, help="KV-cache length (a checkpoint folder: default 4096; YaRN "
                   "follows the config whatever this is)")
    p.add_argument("--max-batch-size", type=int, help="KV-cache batch (a checkpoint folder: default 8)")
    p.add_argument("--quantize", choices=("fp8",), help="FP8 (e4m3, 128x128 block scales) Linear weights, "
                   "quantised on load from a float checkpoint")


TOKENS_HELP = ("comma-separated token counts (e.g. 1,16,128,4096): each count's power-of-two bucket gets a config "
               "table, and every kernel the runtime launches for them is built (default 1,16,128,1024,4096,16384 "
               "up to max_batch_size * max_seq_len); a count between two buckets runs the next one up")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dskc", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: the trained tiny-text model eager vs compiled, text in and out "
                       "(--random: random weights)")
    d.add_argument("--prompt", action="append", help="a text prompt (repeatable; default four built-in prompts)")
    d.add_argument("--checkpoint", help="a tiny-text checkpoint directory (default: the packaged one)")
    d.add_argument("--new-tokens", type=int, default=None, help="default 32 (trained) or 8 (--random)")
    d.add_argument("--random", action="store_true", help="random weights and token ids instead of the trained model")
    d.add_argument("--model", default="tiny", help="with --random: the config")
    d.add_argument("--prompt-lens", type=int, nargs="+", default=[12, 7, 20], help="with --random: prompt lengths")
    d.add_argument("--seed", type=int, default=0, help="with --random: weights and prompts")
    d.add_argument("--target", default="sm90a", help="arch the kernels are built for (sm90a, sm100a, sm80)")
    d.add_argument("--no-compile", action="store_true", help="only the eager part")
    d.add_argument("--capture", choices=("module", "dynamo"), default="dynamo", help=CAPTURE_HELP)
    r = sub.add_parser("report", help="cross-compile a kernel stem and print registers/shared/spills/tensor cores")
    r.add_argument("stem")
    r.add_argument("--problem", required=True, help='JSON, e.g. \'{"M": 128, "N": 4096, "K": 7168}\'')
    r.add_argument("--config", help="JSON config (default: the arch's default)")
    r.add_argument("--target", default="sm90a")
    c = sub.add_parser("compile", help="ahead-of-time: build every kernel of a model for a target, with a manifest")
    c.add_argument("--model", required=True, help=MODEL_HELP)
    c.add_argument("--target", required=True, help="sm90a | sm100a | sm80")
    c.add_argument("--out", required=True, help="output directory (cubins + manifest.json)")
    c.add_argument("--capture", choices=("module", "dynamo"), default="module", help=CAPTURE_HELP)
    _model_options(c)
    c.add_argument("--tokens", help=TOKENS_HELP)
    u = sub.add_parser("run", help="generate on the generated kernels (compiled now, or loaded from --from DIR)")
    u.add_argument("--model", default=None, help=MODEL_HELP + " (default tiny)")
    u.add_argument("--from", dest="from_dir", help="a `dskc compile --out` directory: its kernels and model config")
    u.add_argument("--target", default="auto", help="arch to compile for when not --from (auto: this GPU; sm90a "
                   "without one)")
    u.add_argument("--checkpoint", help="weights directory (DeepSeek or HF layout); default: the --model folder's, "
                   "else random weights")
    u.add_argument("--prompt", action="append", help="a prompt (repeat for a batch): text, through the checkpoint "
                   "folder's tokenizer.json; token ids ('1 2 3') when there is none")
    u.add_argument("--prompt-lens", type=int, nargs="+", default=[7, 5], help="random prompts of these lengths "
                   "when no --prompt")
    u.add_argument("--new-tokens", type=int, default=8)
    u.add_argument("--seed", type=int, default=0)
    _model_options(u)
    e = sub.add_parser("explain", help="IR after each pass, region -> kernel table, fallbacks")
    e.add_argument("--model", default="tiny", help=MODEL_HELP)
    e.add_argument("--target", default="sm90a")
    e.add_argument("--no-build", action="store_true", help="skip cross-compiling (no register/spill columns)")
    e.add_argument("--table-only", action="store_true", help="only the kernel table and fallbacks")
    e.add_argument("--capture", choices=("module", "dynamo"), default="module", help=CAPTURE_HELP)
    _model_options(e)
    e.add_argument("--tokens", help=TOKENS_HELP)
    sub.add_parser("tune", help="autotune kernels with Optuna (see `dskc tune --help`)", add_help=False)
    sub.add_parser("bench", help="benchmark suites to JSON + plots (see `dskc bench --help`)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=knobs.get().log_level, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "tune":
        return _tune(None, argv[1:])
    if argv and argv[0] == "bench":
        from dskc.benchmark.cli import main as bench_main
        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"demo": _demo, "report": _report, "compile": _compile, "run": _run,
                "explain": _explain}[args.cmd](args)
    except (ValueError, KeyError, RuntimeError) as exc:
        print(f"dskc {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
