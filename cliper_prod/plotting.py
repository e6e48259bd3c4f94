"""Training-curve figure: loss and the validation metric per epoch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cliper_prod.io import atomic_path  # noqa: E402


def plot_training_curve(history: list[dict], valid_metric: str, best_epoch: int, path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [h["loss"] for h in history], color="tab:blue")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="BPR loss")
    ax_val.plot(epochs, [h["valid"][valid_metric] for h in history], color="tab:green")
    ax_val.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch {best_epoch}")
    ax_val.set(xlabel="epoch", ylabel=f"valid {valid_metric}", title="validation")
    ax_val.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
