"""Charts (matplotlib, Agg backend): the finetune's training and validation loss, variant scores per split,
and the deployed variant's confusion matrix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI, `make demo`, Ray workers; the notebook shows the PNG inline
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

VARIANT_NAMES = {"vanilla": "zero-shot", "bfrs": "BFRS-optimized"}


def plot_variant_scores(
    scores: Mapping[str, Mapping[str, float]],
    path: str | Path,
    title: str,
    references: Mapping[str, float] | None = None,
) -> Path:
    """Grouped bars, one group per model ("base", "finetuned"), one bar per variant; scores in 0-1.

    `references` are drawn as labeled horizontal lines (the teacher, the baselines).
    """
    models = list(scores)
    variants = list(dict.fromkeys(v for m in models for v in scores[m]))
    x = np.arange(len(models))
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, variant in enumerate(variants):
        values = [100 * scores[m].get(variant, np.nan) for m in models]
        bars = ax.bar(x + (i - (len(variants) - 1) / 2) * width, values, width, label=VARIANT_NAMES.get(variant, variant))
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, (name, value) in enumerate((references or {}).items()):
        ax.axhline(100 * value, color="black" if i == 0 else "dimgray", linestyle=styles[i % len(styles)],
                   linewidth=1)
        ax.text(len(models) - 0.5, 100 * value, f"{name} {100 * value:.1f}%", ha="right", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{m} student" for m in models])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion_matrix(
    gold: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str], path: str | Path, title: str
) -> Path:
    """Rows: true label; columns: predicted label (answers outside `labels` are counted as 'invalid')."""
    index = {label: i for i, label in enumerate(labels)}
    n = len(labels)
    matrix = np.zeros((n, n + 1), dtype=int)
    for g, p in zip(gold, predicted, strict=True):
        matrix[index[g], index.get(p, n) if p is not None else n] += 1
    columns = list(labels) + ["invalid"]
    if not matrix[:, n].any():
        matrix, columns = matrix[:, :n], list(labels)
    size = max(6.0, 0.32 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                    color="white" if v > matrix.max() / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_loss_curve(losses: Sequence[float], path: str | Path, title: str, steps: int | None = None,
                    loss_steps: Sequence[int] | None = None,
                    validation: Sequence[tuple[int, float]] | None = None, chosen_step: int | None = None) -> Path:
    """The training loss as the trainer logged it and, when the finetune held out a validation slice, the
    validation loss at each evaluation (step, loss) with the checkpoint kept (`chosen_step`) marked.

    x is the training step: `loss_steps` gives each logged loss's step; without it, when `steps` (the run's
    total) is given, the i-th of n values is placed at step (i + 1) * steps / n (the trainer logs every
    `logging_steps` steps). A moving average is drawn over long, noisy curves (one value per step).
    """
    if not losses:
        raise ValueError("plot_loss_curve needs at least one loss value")
    y = np.asarray(losses, dtype=float)
    n = len(y)
    if loss_steps is not None and len(loss_steps) == n:
        x = np.asarray(loss_steps, dtype=float)
    else:
        x = np.arange(1, n + 1) * (steps / n if steps else 1)
    by_step = loss_steps is not None or bool(steps)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(x, y, color="tab:blue", alpha=0.45 if n > 20 else 1.0, linewidth=1, marker="o" if n <= 20 else None,
            label="training loss")
    if n > 20:
        window = max(2, n // 15)
        smooth = np.convolve(y, np.ones(window) / window, mode="valid")
        ax.plot(x[window - 1:], smooth, color="tab:blue", linewidth=2, label=f"moving average ({window} logs)")
    all_y = list(y)
    if validation:
        vx = np.asarray([s for s, _ in validation], dtype=float)
        vy = np.asarray([v for _, v in validation], dtype=float)
        all_y += list(vy)
        ax.plot(vx, vy, color="tab:orange", linewidth=2, marker="s", label="validation loss (held-out SFT examples)")
        for sx, sy in zip(vx, vy):
            ax.annotate(f"{sy:.3f}", (sx, sy), textcoords="offset points", xytext=(0, 7), fontsize=7, ha="center",
                        color="tab:orange")
        if chosen_step is not None:
            ax.axvline(chosen_step, color="tab:green", linestyle="--", linewidth=1,
                       label=f"checkpoint kept (step {chosen_step})")
    ax.set_xlabel("training step" if by_step else "logged step")
    ax.set_ylabel("loss (answer tokens)")
    lo, hi = min(all_y), max(all_y)
    ax.set_yscale("log" if lo > 0 and hi / lo > 20 else "linear")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.annotate(f"{y[0]:.3f}", (x[0], y[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.annotate(f"{y[-1]:.3f}", (x[-1], y[-1]), textcoords="offset points", xytext=(-10, 6), fontsize=8, ha="right")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
