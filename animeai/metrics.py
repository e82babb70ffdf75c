"""Classification metrics shared by training-time evaluation and ``animeai evaluate``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per-sample booleans: is the target among the top-k predictions (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hits = top == targets.unsqueeze(1)
    return {k: hits[:, : min(k, maxk)].any(dim=1) for k in ks}


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[true, predicted]`` counts."""
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(logits: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Top-1/top-5, per-class accuracy and the confusion matrix, as plain JSON-ready values."""
    n = len(class_names)
    hits = topk_correct(logits, targets, (1, 5))
    preds = logits.argmax(dim=1)
    cm = confusion_matrix(preds, targets, n)
    support = cm.sum(dim=1)
    per_class = {
        name: {"accuracy": (cm[i, i] / support[i]).item() if support[i] > 0 else None, "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return {
        "num_images": int(targets.numel()),
        "top1": hits[1].float().mean().item() if targets.numel() else float("nan"),
        "top5": hits[5].float().mean().item() if targets.numel() else float("nan"),
        "per_class": per_class,
        "class_names": list(class_names),
        "confusion_matrix": cm.tolist(),
    }


def plot_confusion_matrix(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    """Row-normalised confusion matrix as a PNG (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(cm, dtype=torch.float64)
    norm = m / m.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(class_names)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=list(class_names), rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels=list(class_names), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if m[i, j] > 0:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
