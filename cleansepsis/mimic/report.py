"""The short data report: cohort counts, missingness and range per state variable, the 5 x 5 action
histogram (also as a heatmap image) and the dose bin edges. Written into the output folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from cleansepsis.mimic import features as feat


def action_histogram(fluid_level: np.ndarray, vaso_level: np.ndarray) -> np.ndarray:
    """(5, 5) counts: rows fluid level, columns vasopressor level."""
    counts = np.zeros((5, 5), np.int64)
    np.add.at(counts, (np.asarray(fluid_level), np.asarray(vaso_level)), 1)
    return counts


def variable_summary(obs_rows: pl.DataFrame) -> dict[str, dict]:
    """Per state value, over all obs rows: share missing (before the median fill), min, median, max."""
    out = {}
    for name in feat.STATE_VALUES:
        values = obs_rows.get_column(name).cast(pl.Float64).to_numpy()
        known = values[np.isfinite(values)]
        out[name] = {
            "missing_share": float(1.0 - known.size / max(values.size, 1)),
            "min": float(known.min()) if known.size else None,
            "median": float(np.median(known)) if known.size else None,
            "max": float(known.max()) if known.size else None,
        }
    return out


def save_heatmap(counts: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=100)
    image = ax.imshow(counts, cmap="viridis", origin="lower")
    for f in range(5):
        for v in range(5):
            ax.text(v, f, str(int(counts[f, v])), ha="center", va="center", color="w", fontsize=8)
    ax.set_xlabel("vasopressor level (0 none, 1-4 quartiles)")
    ax.set_ylabel("IV fluid level (0 none, 1-4 quartiles)")
    ax.set_title("Logged actions (all splits)")
    fig.colorbar(image, ax=ax, label="transitions")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def write_report(
    folder: Path, meta: dict, frame: pl.DataFrame, obs_rows: pl.DataFrame, fluid_level, vaso_level
) -> dict:
    counts = action_histogram(fluid_level, vaso_level)
    variables = variable_summary(obs_rows)
    split_counts = frame.group_by("split").agg(pl.len(), pl.col("episode_id").n_unique().alias("episodes"))
    summary = {
        "cohort_counts": meta["cohort_counts"],
        "n_transitions": meta["n_transitions"],
        "n_episodes": meta["n_episodes"],
        "splits": {
            r["split"]: {"transitions": r["len"], "episodes": r["episodes"]} for r in split_counts.to_dicts()
        },
        "action_histogram_fluid_by_vaso": counts.tolist(),
        "action_bins": meta["action_bins"],
        "variables": variables,
        "content_hash": meta["content_hash"],
        "reward": meta["reward"],
        "step_hours": meta["step_hours"],
        "window_hours": meta["window_hours"],
    }
    (folder / "report.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    save_heatmap(counts, folder / "action_heatmap.png")
    lines = [
        "# MIMIC-IV Sepsis-3 replay: data report",
        "",
        f"Step {meta['step_hours']} h, window {meta['window_hours'][0]} h to +{meta['window_hours'][1]} h around onset; "
        f"reward `{meta['reward']['name']}`; {meta['n_episodes']} episodes, {meta['n_transitions']} transitions.",
        "",
        "## Cohort",
        "",
        "| step | stays |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in meta["cohort_counts"].items()),
        "",
        "## Actions (rows: fluid level 0-4, columns: vasopressor level 0-4)",
        "",
        "![action histogram](action_heatmap.png)",
        "",
        "| fluid \\ vaso | 0 | 1 | 2 | 3 | 4 |",
        "|---|---|---|---|---|---|",
        *(f"| {f} | " + " | ".join(str(int(c)) for c in counts[f]) + " |" for f in range(5)),
        "",
        f"Vasopressor edges (NE-eq ug/kg/min, q25/q50/q75 of non-zero train doses): {meta['action_bins']['vaso_edges']}",
        f"Fluid edges (tonicity-adjusted mL per step): {meta['action_bins']['fluid_edges']}",
        "",
        "## State variables (raw units, before the median fill)",
        "",
        "| variable | unit | missing | min | median | max |",
        "|---|---|---|---|---|---|",
    ]
    units = feat.units()
    for name, s in variables.items():

        def fmt(x):
            return "" if x is None else f"{x:.4g}"

        lines.append(
            f"| {name} | {units.get(name, '')} | {s['missing_share']:.1%} | {fmt(s['min'])} | {fmt(s['median'])} | {fmt(s['max'])} |"
        )
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    return summary
