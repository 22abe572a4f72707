"""Markdown tables (dskc vs baselines, one row per case) and the PNG plot (matplotlib, Agg backend) of a result."""
from __future__ import annotations

from pathlib import Path

UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s", "tokens_per_s": "tokens/s"}
# Column order of the tables: dskc first, then measured baselines, then published reference rows.
ORDER = ("dskc-default", "dskc-tuned", "dskc-bf16", "dskc", "dskc-backend", "torch-bf16", "torch-scaled-mm", "torch-grouped-mm",
         "torch-sdpa", "torch-compile", "deep_gemm", "flash_mla", "vllm", "published-deepgemm", "published-flashmla",
         "published-flaggems")


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] == "skipped":
        return "skip"
    if row["status"] == "error":
        return "error"
    value = row[row["primary"]]
    text = f"{value:,.1f}" if value >= 10 else f"{value:.3g}"
    pct = row["pct_bandwidth"] if row["primary"] == "gbps" else row["pct_compute"]
    text = f"{text} ({pct:.0f}%)" if pct is not None and row["kind"] == "measured" else text
    launches = row.get("launches_per_step")
    return text if launches is None else f"{text}, {launches} launches"


def _header(doc: dict) -> list[str]:
    env, ce = doc["env"], doc["ceilings"]
    where = env["gpu"] or f"CPU ({env['platform']})"
    lines = [f"# dskc bench: suite `{doc['suite']}`", "", f"**{doc['label']}**", "",
             f"- date: {doc['date']}; device: {where}; driver {env['driver']}; CUDA {env['cuda']}; "
             f"torch {env['torch']}; triton {env['triton']}; dskc {env['dskc']} ({env['git_commit']})",
             "- ceilings measured in this run: " + "; ".join(
                 f"{c['name']}: {c['value']:,.1f} {c['unit']}" for c in ce.values()),
             "- cells: the case's figure (TFLOP/s, GB/s or tokens/s) and, for measured rows, its % of this run's "
             "ceiling (compute: fp8 rows against the fp8 ceiling where measured, else bf16; GB/s against the "
             "copy). `published-*` columns are the libraries' own figures on their hardware, not measured here.",
             ""]
    return lines


def _suite_table(rows: list[dict]) -> list[str]:
    impls = [i for i in ORDER if any(r["impl"] == i for r in rows)]
    impls += sorted({r["impl"] for r in rows} - set(impls))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    by = {(r["case"], r["impl"]): r for r in rows}
    lines = ["| case | unit | " + " | ".join(impls) + " | dskc / best measured baseline |",
             "|---|---|" + "---|" * (len(impls) + 1)]
    for case in cases:
        unit = UNITS[next(r["primary"] for r in rows if r["case"] == case)]
        mine = [r for r in rows if r["case"] == case]
        lines.append(f"| {case} | {unit} | " + " | ".join(_cell(by.get((case, i))) for i in impls)
                     + f" | {_ratio(mine)} |")
    return lines


def _ratio(rows: list[dict]) -> str:
    """Best dskc figure over the best measured baseline's (published rows excluded), e.g. "1.24x"."""
    ok = [r for r in rows if r["status"] == "ok" and r["kind"] == "measured"]
    dskc = [r[r["primary"]] for r in ok if r["impl"].startswith("dskc")]
    base = [r[r["primary"]] for r in ok if not r["impl"].startswith("dskc")]
    return f"{max(dskc) / max(base):.2f}x" if dskc and base and max(base) > 0 else ""


def _notes(rows: list[dict]) -> list[str]:
    seen, lines = set(), []
    for r in rows:
        if r["status"] != "ok" and (r["impl"], r["note"]) not in seen:
            seen.add((r["impl"], r["note"]))
            lines.append(f"- {r['impl']} ({r['status']}, first at {r['case']}): {r['note']}")
    return lines


def markdown(doc: dict, png: Path | None = None) -> str:
    lines = _header(doc)
    if png is not None:
        lines += [f"![{doc['suite']} plot]({Path(png).name})", ""]
    for suite in ("gemm", "moe", "mla", "model"):
        rows = [r for r in doc["results"] if r["suite"] == suite]
        if rows:
            lines += [f"## {suite}", ""] + _suite_table(rows) + [""]
            notes = _notes(rows)
            if notes:
                lines += ["Skipped / failed rows:", ""] + notes[:40] + [""]
    lines += ["## KV cache bytes per token (all layers)", "", "| model | attention | dtype | bytes/token |",
              "|---|---|---|---|"]
    lines += [f"| {k['model']} | {k['attn_impl']} | {k['dtype']} | {k['bytes_per_token']:,} |"
              for k in doc["kv_cache"]]
    return "\n".join(lines) + "\n"


def _roofline(ax, doc: dict) -> None:
    import numpy as np

    ce = doc["ceilings"]
    bw = ce["copy"]["value"] / 1e3  # TB/s
    rows = [r for r in doc["results"] if r["status"] == "ok" and r["kind"] == "measured" and r["tflops"]
            and r["bytes"]]
    ai = np.logspace(-1, 4, 200)
    for key, style in (("bf16_matmul", "-"), ("fp8_scaled_mm", "--")):
        if key in ce:
            ax.plot(ai, np.minimum(ce[key]["value"], ai * bw), "k" + style, lw=1, label=f"roof: {ce[key]['name']}")
    impls = sorted({r["impl"] for r in rows})
    for i, impl in enumerate(impls):
        pts = [(r["flops"] / r["bytes"], r["tflops"]) for r in rows if r["impl"] == impl]
        ax.scatter(*zip(*pts), s=14, marker="os^vD<>p*h"[i % 10], label=impl)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte)", ylabel="TFLOP/s",
           title="kernels against this run's measured ceilings")
    ax.legend(fontsize=6, loc="lower right")


def _tokens(ax, doc: dict) -> None:
    rows = [r for r in doc["results"] if r["suite"] == "model" and r["status"] == "ok"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = sorted({r["impl"] for r in rows})
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        vals = [next((r["tokens_per_s"] for r in rows if r["case"] == c and r["impl"] == impl), 0) for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=60, ha="right", fontsize=6)
    ax.set(yscale="log" if rows else "linear", ylabel="tokens/s", title="model: tokens/s")
    ax.legend(fontsize=6)


def plot(doc: dict, path: Path) -> Path:
    """Roofline of the kernel rows and tokens/s bars of the model rows (the panels that have data; a smoke run is
    titled as not kernel performance). Writes a PNG at `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = any(r["suite"] != "model" and r["status"] == "ok" for r in doc["results"])
    model = any(r["suite"] == "model" and r["status"] == "ok" for r in doc["results"])
    panels = [p for p, has in ((_roofline, kernels), (_tokens, model)) if has] or [_roofline]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        panel(ax, doc)
    gpu = doc["env"]["gpu"] or "CPU"
    title = f"dskc bench {doc['suite']} on {gpu}, {doc['date'][:10]}"
    if doc["mode"] == "cpu-smoke":
        title += "\nCPU SMOKE RUN (Triton interpreter): NOT kernel performance"
    fig.suptitle(title, fontsize=10, color="red" if doc["mode"] == "cpu-smoke" else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
