"""Training and validation curves: a run's, as a PNG from metrics.jsonl; several runs' validation
curves overlaid (mt compare). Both need matplotlib (the `plot` extra)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

from mt.errors import MTError


def plot_metrics(metrics: Path, out: Path) -> bool:
    """Plot train/valid loss and validation BLEU; returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("mt: matplotlib is not installed; skipping the plot (pip install 'mt[plot]')", file=sys.stderr)
        return False
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    valid = [r for r in rows if r["kind"] == "valid"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=0.8)
    if valid and "valid_loss" in valid[0]:
        ax1.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("label-smoothed loss per token")
    ax1.legend()
    if valid and "valid_bleu" in valid[0]:
        ax2.plot([r["step"] for r in valid], [r["valid_bleu"] for r in valid], "o-", label="valid BLEU")
        ax2.plot([r["step"] for r in valid], [r["valid_chrf"] for r in valid], "s-", label="valid chrF")
        ax2.legend()
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


# metrics.jsonl key -> axis title, in the order of the panels
VALIDATION_PANELS = {"valid_bleu": "validation BLEU (greedy)", "valid_chrf": "validation chrF (greedy)",
                     "valid_loss": "validation loss per token"}
FIGURE_FORMATS = ("png", "svg", "pdf")


def _pyplot() -> Any:
    """matplotlib.pyplot on a backend without a display; an error that says what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MTError("plotting needs matplotlib: pip install 'mt[plot]'") from None
    return plt


def check_plotting() -> None:
    """Fail now, before long work, if a figure could not be drawn later."""
    _pyplot()


def validation_figure(runs: dict[str, list[dict[str, Any]]], fmt: str) -> bytes:
    """The validation curves of several runs overlaid, one panel per metric any run logged
    (BLEU, chrF, loss against the step), as `fmt` (png, svg or pdf) bytes."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = [k for k in VALIDATION_PANELS if any(k in r for rows in runs.values() for r in rows)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=False):
        for label, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", ms=3, label=label)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(VALIDATION_PANELS[key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format=fmt, dpi=100)
    plt.close(fig)
    return out.getvalue()
