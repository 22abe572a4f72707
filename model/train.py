"""Train `tiny-text`: the `tiny` DeepSeek-V3 shape with a byte vocabulary, on text that ships with Python.

    python -m dskc.model.train [--out DIR] [--seed 0] [--steps 700] [--threads 2] [--expect-sha256 HEX]

Corpus: the running Python's `pydoc_data.topics` (the language-reference pages `help()` shows; 466,273 bytes in
3.11.7), its topics joined in sorted order, UTF-8 bytes as tokens (vocabulary 256). The stdlib's text differs
between Python versions, so its sha256 is recorded (and --expect-sha256 refuses another). The last 1/16 of the
bytes is held out for validation.

Training: plain PyTorch autograd in float32 on the CPU through the model's own modules (MLA.forward_uncached: the
naive attention without the KV cache), AdamW, warmup + cosine learning rate. Experts are balanced as DeepSeek-V3
does it without an auxiliary loss: after every step, each MoE gate's selection bias moves a fixed step towards
balance, bias_i += gamma * sign(mean load - load_i), with the loads counted over that step's batch. Deterministic
given the seed and the thread count (only float reduction order can change with the machine).

Output: the weights in dskc's FP8 format (e4m3 + fp32 128x128 block scales, DeepSeek's checkpoint layout) and
record.json: corpus + sha256, settings, wall and CPU time, the loss curve, validation bits per byte (float32,
bf16, FP8 weights, FP8 weights + activations) and the experts' load on the validation text.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .args import ModelArgs, get_config
from .checkpoint import save_checkpoint
from .fp8 import quantize_weight
from .loader import load_checkpoint
from .mla import RMSNorm
from .model import Transformer
from .moe import Gate
from .parallel import Linear, ParallelEmbedding

CONFIG_NAME = "tiny-text"
CHECKPOINT_DIR = Path(__file__).with_name("checkpoints") / CONFIG_NAME
RECORD = "record.json"
LN2 = math.log(2)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 700
    batch: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_step: float = 1e-2         # gamma of the bias update (DeepSeek-V3: 1e-3 over ~10^5 steps; 700 need more)
    val_fraction: float = 1 / 16
    eval_every: int = 100
    threads: int = 1               # the committed run used 1; float reduction order changes with the count


# ---- corpus ---------------------------------------------------------------------------------------------------
def corpus() -> tuple[bytes, dict]:
    """(the corpus bytes, a description of it: source, python version, bytes, sha256)."""
    from pydoc_data import topics as module

    data = "\n\n".join(module.topics[k] for k in sorted(module.topics)).encode("utf-8")
    return data, {"source": "pydoc_data.topics (the topics joined in sorted order, UTF-8)",
                  "python": sys.version.split()[0], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def split(data: bytes, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) byte tensors (int64): the last val_fraction of the corpus is the validation slice."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = len(t) - int(len(t) * val_fraction)
    return t[:cut], t[cut:]


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    """Bytes -> text; a sequence cut inside a multi-byte character shows U+FFFD there."""
    return bytes(tokens).decode("utf-8", errors="replace")


# ---- the model in training --------------------------------------------------------------------------------------
def training_config() -> ModelArgs:
    """tiny-text with bf16 (plain, trainable) Linear weights instead of FP8."""
    return get_config(CONFIG_NAME, dtype="bf16")


@torch.no_grad()
def init_for_training(model: Transformer, seed: int) -> Transformer:
    """Linear / gate weights ~ N(0, 1/in), residual-branch outputs (wo, w2) further / sqrt(2 n_layers); embedding
    ~ N(0, 1); norms 1; gate bias 0. Then every floating parameter but the gate bias requires grad."""
    gen = torch.Generator().manual_seed(int(seed))
    out_scale = (2 * model.args.n_layers) ** -0.5
    for name, mod in model.named_modules():
        if isinstance(mod, (Linear, Gate)):
            std = mod.weight.shape[1] ** -0.5 * (out_scale if name.endswith((".wo", ".w2")) else 1.0)
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
            if isinstance(mod, Gate) and mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, ParallelEmbedding):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))
        elif isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
    for name, p in model.named_parameters():
        p.requires_grad_(p.is_floating_point() and not name.endswith("gate.bias"))
    return model


def all_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits at every position [bsz, seqlen, vocab] (the model's dtype) of tokens at positions 0..seqlen-1, with
    no KV cache: the same modules as Transformer.forward, attention through MLA.forward_uncached. Differentiable."""
    seqlen = tokens.shape[1]
    if seqlen > model.args.max_seq_len:
        raise ValueError(f"{seqlen} positions > max_seq_len ({model.args.max_seq_len})")
    h = model.embed(tokens)
    rope = model.rope[:seqlen]
    mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device).triu_(1) if seqlen > 1 else None
    for layer in model.layers:
        h = h + layer.attn.forward_uncached(layer.attn_norm(h), rope, mask)
        h = h + layer.ffn(layer.ffn_norm(h))
    return model.head(model.norm(h))


class ExpertLoad:
    """Counts the tokens each routed expert is picked for, per MoE layer, through forward hooks on the gates."""

    def __init__(self, model: Transformer):
        self.gates = {name: m for name, m in model.named_modules() if isinstance(m, Gate)}
        self.counts = {name: torch.zeros(m.weight.shape[0], dtype=torch.long) for name, m in self.gates.items()}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in self.gates.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.counts[name] += torch.bincount(output[1].flatten().cpu(), minlength=len(self.counts[name]))
        return hook

    def reset(self) -> None:
        for c in self.counts.values():
            c.zero_()

    def max_over_mean(self) -> dict[str, float]:
        """Per layer: the busiest expert's load over the mean load (1.0 = perfectly balanced)."""
        return {n: (c.max() / c.float().mean()).item() if c.sum() else float("nan") for n, c in self.counts.items()}

    @torch.no_grad()
    def balance(self, step: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free update: bias_i += step * sign(mean load - load_i)."""
        for name, gate in self.gates.items():
            load = self.counts[name].float()
            gate.bias += step * torch.sign(load.mean() - load)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def bits_per_byte(model: Transformer, data: torch.Tensor, seq_len: int, batch: int = 16) -> float:
    """Mean cross-entropy in bits of each byte of `data` given the bytes before it in its window (non-overlapping
    windows of seq_len + 1 bytes; each window's first byte is context only)."""
    n = (len(data) - 1) // seq_len
    windows = torch.stack([data[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])
    total = 0.0
    for chunk in windows.split(batch):
        logits = all_logits(model, chunk[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    return total / (n * seq_len) / LN2


# ---- training -------------------------------------------------------------------------------------------------
def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over cfg.warmup steps, then cosine from cfg.lr down to cfg.min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def _optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


class Clock:
    """Wall and process CPU time since creation, and the 1-minute load average (how busy the machine is)."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        self.loads = []

    def now(self) -> dict:
        load = os.getloadavg()[0]
        self.loads.append(load)
        return {"wall_s": time.perf_counter() - self.wall0, "cpu_s": time.process_time() - self.cpu0, "load1": load}


def _progress(step: int, cfg: TrainConfig, loss: float, lr: float, clock: Clock, load: ExpertLoad) -> str:
    t = clock.now()
    tokens = (step + 1) * cfg.batch * cfg.seq_len
    experts = " ".join(f"{v:.2f}" for v in load.max_over_mean().values())
    return (f"step {step + 1:4d}/{cfg.steps}  loss {loss:.3f}  bpb {loss / LN2:.3f}  lr {lr:.1e}  "
            f"{tokens / t['wall_s']:,.0f} tok/s  wall {t['wall_s']:.0f}s cpu {t['cpu_s']:.0f}s "
            f"load1 {t['load1']:.1f}  experts max/mean {experts}")


def train(cfg: TrainConfig = TrainConfig(), log=print) -> tuple[Transformer, dict]:
    """Train from scratch; returns the float32 model and the record (without the FP8 figures)."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    data, about = corpus()
    train_data, val_data = split(data, cfg.val_fraction)
    model = init_for_training(Transformer(training_config(), attn_impl="naive", dtype=torch.float32), cfg.seed)
    opt, gen, load, clock = _optimizer(model, cfg), torch.Generator().manual_seed(cfg.seed), ExpertLoad(model), Clock()
    log(f"training {CONFIG_NAME}: {sum(p.numel() for p in model.parameters()):,} parameters, corpus "
        f"{about['bytes']:,} bytes (train {len(train_data):,}, validation {len(val_data):,}), sha256 "
        f"{about['sha256'][:16]}..., {cfg.steps} steps x {cfg.batch} x {cfg.seq_len} bytes, {cfg.threads} threads")
    curve, val_curve, every = [], [], max(1, cfg.steps // 35)
    for step in range(cfg.steps):
        starts = torch.randint(0, len(train_data) - cfg.seq_len - 1, (cfg.batch,), generator=gen)
        batch = torch.stack([train_data[s:s + cfg.seq_len + 1] for s in starts.tolist()])
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        load.reset()
        logits = all_logits(model, batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        load.balance(cfg.bias_step)
        curve.append(round(loss.item(), 4))
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            log(_progress(step, cfg, loss.item(), lr, clock, load))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val_curve.append([step + 1, round(bits_per_byte(model, val_data, cfg.seq_len), 4)])
            log(f"  validation bits/byte {val_curve[-1][1]:.4f}")
    load.remove()
    t = clock.now()
    record = {"config": CONFIG_NAME, "corpus": {**about, "validation": f"the last {len(val_data):,} bytes",
                                                "train_bytes": len(train_data), "validation_bytes": len(val_data)},
              "train": dataclasses.asdict(cfg), "seconds": _seconds(t, clock, cfg),
              "loss_curve": curve, "validation_curve": val_curve}
    return model, record


def _seconds(t: dict, clock: Clock, cfg: TrainConfig) -> dict:
    return {"wall": round(t["wall_s"], 1), "cpu": round(t["cpu_s"], 1),
            "cpu_per_wall": round(t["cpu_s"] / t["wall_s"], 2), "threads": cfg.threads,
            "load1_mean": round(sum(clock.loads) / len(clock.loads), 2), "load1_max": round(max(clock.loads), 2),
            "steps_per_s": round(cfg.steps / t["wall_s"], 3), "machine": f"{os.cpu_count()} cores"}


# ---- FP8 checkpoint and its figures -----------------------------------------------------------------------------
@torch.no_grad()
def to_fp8(trained: Transformer, attn_impl: str = "absorb", gemm_impl: str = "bf16") -> Transformer:
    """The trained weights in tiny-text's FP8 format (bf16 compute): every FP8 Linear's weight quantised to e4m3
    with 128x128 block scales (quantize_weight), the rest (embedding, head, norms, gates) rounded to bf16, the gate
    bias kept in float32."""
    state = {k: v.detach() for k, v in trained.state_dict().items()}
    model = Transformer(get_config(CONFIG_NAME), attn_impl=attn_impl, gemm_impl=gemm_impl)
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and mod.scale is not None:
            state[f"{name}.weight"], state[f"{name}.scale"] = quantize_weight(state[f"{name}.weight"].float())
    model.load_state_dict(state)
    return model


def load_trained(directory: str | os.PathLike = CHECKPOINT_DIR, *, attn_impl: str = "absorb",
                 dtype: torch.dtype = torch.bfloat16, gemm_impl: str = "bf16") -> Transformer:
    """The committed (or a freshly written) tiny-text checkpoint in a Transformer."""
    model = Transformer(get_config(CONFIG_NAME), attn_impl=attn_impl, dtype=dtype, gemm_impl=gemm_impl)
    return load_checkpoint(model, directory)


@torch.no_grad()
def evaluate(trained: Transformer, data: bytes, cfg: TrainConfig) -> dict:
    """Validation bits per byte of the trained weights: float32, bf16, FP8 weights, FP8 weights + 1x128 FP8
    activations (the compiled FP8 recipe); and the FP8 model's expert load (expert_load)."""
    train_data, val_data = split(data, cfg.val_fraction)
    bf16 = Transformer(training_config(), attn_impl="naive")
    bf16.load_state_dict(trained.state_dict())
    fp8 = to_fp8(trained, "naive")
    figures = {"float32": bits_per_byte(trained, val_data, cfg.seq_len),
               "bf16": bits_per_byte(bf16, val_data, cfg.seq_len),
               "fp8_weights": bits_per_byte(fp8, val_data, cfg.seq_len)}
    report = expert_load(to_fp8(trained, "naive", gemm_impl="fp8"), train_data, val_data, cfg.seq_len)
    figures["fp8_weights_and_activations"] = report.pop("validation_bits_per_byte")
    return {"validation_bits_per_byte": {k: round(v, 4) for k, v in figures.items()}, "expert_load": report}


def train_sample(train_data: torch.Tensor, n_bytes: int, seq_len: int) -> torch.Tensor:
    """About n_bytes of the training text in seq_len + 1 windows spread evenly over it (a fixed sample)."""
    n = max(1, n_bytes // seq_len)
    stride = (len(train_data) - seq_len - 1) // n
    return torch.cat([train_data[i * stride:i * stride + seq_len + 1] for i in range(n)])


@torch.no_grad()
def expert_load(model: Transformer, train_data: torch.Tensor, val_data: torch.Tensor, seq_len: int) -> dict:
    """The routed experts' load, per MoE layer: the busiest expert's share over the mean (1 = balanced) on the
    validation text and on a training sample of the same size, and the validation shares; plus the validation
    bits per byte of `model` (computed on the way)."""
    load = ExpertLoad(model)
    bpb = bits_per_byte(model, val_data, seq_len)
    val_ratio = load.max_over_mean()
    shares = {n: (c.float() / c.sum()).tolist() for n, c in load.counts.items()}
    load.reset()
    sample = train_sample(train_data, len(val_data), seq_len)
    windows = sample.view(-1, seq_len + 1)
    for chunk in windows.split(16):
        all_logits(model, chunk[:, :-1])   # the same positions bits_per_byte routes
    train_ratio = load.max_over_mean()
    load.remove()
    short = lambda name: name.removesuffix(".ffn.gate")   # noqa: E731
    return {"validation_bits_per_byte": bpb,
            "max_over_mean": {short(n): round(v, 3) for n, v in val_ratio.items()},
            "max_over_mean_train_sample": {short(n): round(v, 3) for n, v in train_ratio.items()},
            "fractions": {short(n): [round(x, 4) for x in f] for n, f in shares.items()}}


def save(trained: Transformer, record: dict, out: str | os.PathLike) -> Path:
    """Write the FP8 checkpoint and record.json into `out`; returns the checkpoint file."""
    out = Path(out)
    (path,) = save_checkpoint(to_fp8(trained), out)
    record = {**record, "checkpoint": {"file": path.name, "bytes": path.stat().st_size,
                                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                       "format": "e4m3 weights, fp32 128x128 block scales (DeepSeek layout)"}}
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    (out / "record.md").write_text(record_markdown(record))
    return path


def record_markdown(rec: dict) -> str:
    """The record in a few lines for people (record.json holds all of it)."""
    c, t, s, v = rec["corpus"], rec["train"], rec["seconds"], rec["validation_bits_per_byte"]
    load = rec["expert_load"]
    balance = ", ".join(f"{k} {x:.2f}" for k, x in load["max_over_mean"].items())
    train_balance = ", ".join(f"{k} {x:.2f}" for k, x in load["max_over_mean_train_sample"].items())
    return "\n".join([
        f"# {rec['config']}: trained by `python -m dskc.model.train`", "",
        f"- corpus: {c['source']}, Python {c['python']}, {c['bytes']:,} bytes, sha256 `{c['sha256']}`; "
        f"validation: {c['validation']}",
        f"- seed {t['seed']}, {t['steps']} steps x {t['batch']} sequences x {t['seq_len']} bytes, AdamW lr "
        f"{t['lr']} -> {t['min_lr']}, expert bias step {t['bias_step']}, {t['threads']} thread(s)",
        f"- time: {s['wall']:.0f} s wall, {s['cpu']:.0f} s CPU ({s['steps_per_s']} steps/s) on {s['machine']} shared "
        f"with other jobs (1-minute load average {s['load1_mean']} mean, {s['load1_max']} max)",
        f"- validation bits per byte: float32 {v['float32']}, bf16 {v['bf16']}, FP8 weights {v['fp8_weights']}, "
        f"FP8 weights + 1x128 FP8 activations {v['fp8_weights_and_activations']}",
        f"- expert load (FP8 model), the busiest expert's share over the mean: on the validation text {balance}; "
        f"on a training sample of the same size {train_balance}",
        f"- checkpoint: {rec['checkpoint']['file']}, {rec['checkpoint']['bytes']:,} bytes, "
        f"{rec['checkpoint']['format']}; loss curve: loss.png (`python -m dskc.train_plot`)", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dskc.model.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(CHECKPOINT_DIR), help="output directory (default: the packaged checkpoint)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--threads", type=int, default=TrainConfig.threads)
    p.add_argument("--expect-sha256", help="refuse to train unless the corpus has this sha256")
    a = p.parse_args(argv)
    about = corpus()[1]
    if a.expect_sha256 and about["sha256"] != a.expect_sha256:
        print(f"the corpus differs: sha256 {about['sha256']} (Python {about['python']}), expected "
              f"{a.expect_sha256}; the stdlib's pydoc_data.topics changes between Python versions", file=sys.stderr)
        return 3
    cfg = dataclasses.replace(TrainConfig(), seed=a.seed, steps=a.steps, threads=a.threads)
    trained, record = train(cfg)
    record.update(evaluate(trained, corpus()[0], cfg))
    path = save(trained, record, a.out)
    print(json.dumps({"validation_bits_per_byte": record["validation_bits_per_byte"],
                      "expert_load_max_over_mean": record["expert_load"]["max_over_mean"],
                      "seconds": record["seconds"]}, indent=1))
    print(f"wrote {path} ({path.stat().st_size:,} bytes) and {Path(a.out) / RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
