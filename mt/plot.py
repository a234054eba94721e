"""Training and validation curves as a PNG, from metrics.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path


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
