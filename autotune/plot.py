"""PNG plots of studies (`dskc tune --plot DIR`): optimisation history and parameter importances per study."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import optuna

from dskc.autotune.export import results


def plot_studies(storage, arch, stems, out_dir: Path) -> list[Path]:
    """Write <study>-history.png and <study>-importance.png per study with COMPLETE trials. Returns the files.

    Importances need at least two COMPLETE trials with differing configs; with fewer only the history is drawn.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for res in results(storage, arch, stems):
        if res.best_s is None:
            continue
        study = optuna.load_study(study_name=res.study_name, storage=storage)
        stem = re.sub(r"[^A-Za-z0-9_.=-]+", "_", res.study_name)
        plots = [("history", ovm.plot_optimization_history)]
        if res.counts.get("COMPLETE", 0) >= 2:
            plots.append(("importance", ovm.plot_param_importances))
        for name, fn in plots:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = fn(study)
            ax.set_title(f"{res.study_name} ({res.key['timing_mode']})", fontsize=7)
            path = out_dir / f"{stem}-{name}.png"
            ax.figure.savefig(path, dpi=80, bbox_inches="tight")
            plt.close(ax.figure)
            written.append(path)
    if not written:
        raise ValueError(f"no study for {arch} with a COMPLETE trial to plot")
    return written
