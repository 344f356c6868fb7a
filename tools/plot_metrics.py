"""Plot one or more runs' metrics.jsonl: LM loss (train and validation), aux losses,
gradient norm, learning rate, throughput and expert-load imbalance, one panel each.

    python tools/plot_metrics.py outputs/run1 [outputs/run2 ...] --out curves.png

Several runs share the panels, labelled by their directory, so two layouts of the same
run (e.g. 1 process and ep=4) can be compared by eye. Needs matplotlib
(`pip install 'moetrain[plots]'`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PANELS = [
    ("loss", "LM loss"),
    ("aux_loss", "load-balancing loss (1 = balanced)"),
    ("z_loss", "router z-loss"),
    ("grad_norm", "gradient norm"),
    ("lr", "learning rate"),
    ("tokens_per_s", "tokens / s"),
    ("load_imbalance", "max / mean expert load"),
    ("dropped_frac", "dropped rows (fraction)"),
]


def load_series(run: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} from ``<run>/metrics.jsonl`` (or the file itself);
    validation rows give ``val_loss``."""
    from moetrain.metrics import read_metrics

    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run directory (run.dir) or its "
                                f"metrics.jsonl")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in read_metrics(path):
        for key, value in row.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(int(row["step"]))
            values.append(float(value))
    return series


def plot(runs: list[str], out: str) -> list[str]:
    """Write the figure to ``out``; return the panel keys that had data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {str(r): load_series(r) for r in runs}
    keys = [(k, t) for k, t in PANELS if any(k in s for s in data.values())]
    cols = 2
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, keys):
        for name, series in data.items():
            if key in series:
                ax.plot(*series[key], label=f"{Path(name).name} train" if key == "loss" else
                        Path(name).name, linewidth=1.2)
            if key == "loss" and "val_loss" in series:
                ax.plot(*series["val_loss"], "o--", label=f"{Path(name).name} val", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key in ("loss", "grad_norm"):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [k for k, _ in keys]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (run.dir) or metrics.jsonl files")
    p.add_argument("--out", default="metrics.png", help="output image (PNG/PDF/SVG)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_metrics needs matplotlib: pip install 'moetrain[plots]'", file=sys.stderr)
        return 2
    panels = plot(args.runs, args.out)
    print(f"wrote {args.out} ({', '.join(panels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
