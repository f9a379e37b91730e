"""Evaluation figures (matplotlib, Agg, PNG): action heatmaps, Q-value heatmaps, estimator forest plot."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cleansepsis.io import atomic_file

LEVEL_NAMES = ["0", "1", "2", "3", "4"]
ESTIMATOR_STYLE = {"wis": ("WIS", "o"), "pdwis": ("PDWIS", "s"), "wdr": ("WDR", "D"), "fqe": ("FQE", "^")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path)
    with atomic_file(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    _pyplot().close(fig)
    return path


def action_heatmaps(
    path: str | os.PathLike, panels: Mapping[str, np.ndarray], title: str = "", overwrite: bool = True
) -> Path:
    """One 5x5 panel per policy: share of actions per (fluid level, vasopressor level)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.9), squeeze=False, layout="constrained")
    for ax, (name, joint) in zip(axes[0], panels.items(), strict=True):
        joint = np.asarray(joint, np.float64)
        image = ax.imshow(joint, origin="lower", cmap="Blues", vmin=0, vmax=max(joint.max(), 1e-9))
        for f in range(5):
            for v in range(5):
                color = "white" if joint[f, v] > 0.6 * joint.max() else "black"
                ax.text(v, f, f"{100 * joint[f, v]:.0f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(5), LEVEL_NAMES)
        ax.set_yticks(range(5), LEVEL_NAMES)
        ax.set_xlabel("vasopressor level")
        ax.set_ylabel("IV fluid level")
        ax.set_title(name, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of actions")
    fig.suptitle(title or "Actions (% of states)", fontsize=10)
    return _save(fig, path, overwrite)


def q_heatmap(
    path: str | os.PathLike,
    values: np.ndarray,
    title: str,
    state_label: str = "state (sorted by SOFA)",
    value_label: str = "Q-value",
    overwrite: bool = True,
) -> Path:
    """States x 25 actions heatmap; the caller orders the states."""
    plt = _pyplot()
    values = np.asarray(values, np.float64)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    finite = values[np.isfinite(values)]
    lo, hi = (np.quantile(finite, [0.01, 0.99]) if finite.size else (0.0, 1.0))
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_xticks(range(0, 25, 5), [f"f{f}" for f in range(5)])
    ax.set_xticks(range(25), minor=True)
    ax.set_xlabel("action (5 * fluid + vaso): fluid level at each tick, vasopressor 0-4 within")
    ax.set_ylabel(state_label)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=value_label)
    return _save(fig, path, overwrite)


def forest_plot(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    title: str = "",
    overwrite: bool = True,
) -> Path:
    """rows: {"label", "estimators": {name: {"estimate", "ci_low", "ci_high"}}, "exact": float | None}.
    One line per policy; each estimator a marker with its 95% interval; the exact value a red bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * max(len(rows), 2) + 1.3))
    names = [n for n in ESTIMATOR_STYLE if any(n in r["estimators"] for r in rows)]
    offsets = np.linspace(-0.27, 0.27, max(len(names), 1))
    for i, row in enumerate(rows):
        y = len(rows) - 1 - i
        for offset, name in zip(offsets, names, strict=True):
            est = row["estimators"].get(name)
            if not est or not np.isfinite(est["estimate"]):
                continue
            label, marker = ESTIMATOR_STYLE[name]
            color = f"C{list(ESTIMATOR_STYLE).index(name)}"
            # the interval as drawn from its bounds: a percentile interval need not hold its estimate
            # (WDR refitted per resample on a small held-out set), so no errorbar relative to it
            if np.isfinite(est["ci_low"]) and np.isfinite(est["ci_high"]):
                ax.plot([est["ci_low"], est["ci_high"]], [y + offset] * 2, color=color, lw=1)
                ax.plot([est["ci_low"], est["ci_high"]], [y + offset] * 2, "|", color=color, markersize=5)
            ax.plot(est["estimate"], y + offset, marker, color=color, markersize=4,
                    label=label if i == 0 else None)  # fmt: skip
        if row.get("exact") is not None:
            ax.plot([row["exact"]] * 2, [y - 0.4, y + 0.4], color="red", lw=2, label="exact" if i == 0 else None)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows][::-1], fontsize=8)
    ax.set_xlabel("estimated value (95% bootstrap interval over episodes)")
    ax.set_title(title or "Off-policy estimates", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path, overwrite)
