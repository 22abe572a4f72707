"""The loss curve of a dskc.model.train run as a PNG (matplotlib: the `plot` extra).

    python -m dskc.train_plot [DIR]      # reads DIR/record.json, writes DIR/loss.png (default: the packaged model)

model/ imports only torch, safetensors and the standard library, so the plot lives here, apart from the training.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def plot(directory: str | Path) -> Path:
    """DIR/record.json -> DIR/loss.png: training loss per step (bits per byte, with a 20-step running mean) and
    the validation bits per byte at each evaluation, the final FP8 figures marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    rec = json.loads((directory / "record.json").read_text())
    bits = [x / math.log(2) for x in rec["loss_curve"]]
    smooth = [sum(bits[max(0, i - 19):i + 1]) / len(bits[max(0, i - 19):i + 1]) for i in range(len(bits))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(range(1, len(bits) + 1), bits, color="0.8", lw=0.8, label="training batch")
    ax.plot(range(1, len(bits) + 1), smooth, color="C0", lw=1.5, label="training, 20-step mean")
    steps, val = zip(*rec["validation_curve"])
    ax.plot(steps, val, "o-", color="C1", ms=4, label="validation (float32)")
    final = rec["validation_bits_per_byte"]
    for key, marker in (("bf16", "s"), ("fp8_weights_and_activations", "D")):
        ax.plot([steps[-1]], [final[key]], marker, ms=6, label=f"validation, {key.replace('_', ' ')}: {final[key]:.3f}")
    t = rec["seconds"]
    ax.set(xlabel="step", ylabel="bits per byte", ylim=(0, min(8.5, max(bits) + 0.5)),
           title=f"{rec['config']}: {len(bits)} steps on {rec['corpus']['source'].split()[0]} (Python "
                 f"{rec['corpus']['python']}), {t['wall'] / 60:.0f} min wall, {t['cpu'] / 60:.0f} min CPU")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = directory / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        directory = argv[0]
    else:
        from dskc.model.train import CHECKPOINT_DIR
        directory = CHECKPOINT_DIR
    print(f"wrote {plot(directory)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
