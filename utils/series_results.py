"""What `kernel.py --predict DIR` writes besides slices.csv: one row per series, and
predict.html, an offline page with each series' probabilities along its slices and the
Grad-CAM heatmaps of its highest-scoring slices.

Nothing here reads a DICOM header: the tables it gets hold paths, UIDs and the series
description only, so no patient name, birth date or other identifying text can reach the
outputs (utils/scans.py reads no such tag).
"""
from __future__ import annotations

import html
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from utils.atomic import atomic_write
from utils.labels import ANY as ANY_INDEX
from utils.labels import LABELS
from utils.figures import CLASS_COLORS, png_bytes
from utils.report import html_page, png_src

SERIES_KEYS = ("study_uid", "series_uid")
ANY = LABELS[ANY_INDEX]
POSITIVE, NEGATIVE = "positive", "negative"  # series.csv's flag: is `any` over the threshold anywhere


def series_table(slices: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """One row per (study, series) of the predicted slices: its description and size, the
    maximum probability of each class and the path of the slice where it occurs, how many
    slices have `any` over ``threshold``, and a one-word flag."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    rows = []
    for (study, series), s in slices.groupby(list(SERIES_KEYS), sort=True):
        row = {"study_uid": study, "series_uid": series,
               "series_description": s["series_description"].iloc[0], "n_slices": len(s)}
        for label in LABELS:
            top = s[label].idxmax()
            row[f"max_{label}"] = float(s.at[top, label])
            row[f"at_{label}"] = s.at[top, "path"]
        row["n_over_threshold"] = int((s[ANY] > threshold).sum())
        row["flag"] = POSITIVE if row["n_over_threshold"] else NEGATIVE
        rows.append(row)
    columns = [*SERIES_KEYS, "series_description", "n_slices",
               *(f"{p}_{k}" for k in LABELS for p in ("max", "at")), "n_over_threshold", "flag"]
    return pd.DataFrame(rows, columns=columns)


def top_slices(slices: pd.DataFrame, series: pd.DataFrame, per_series: int = 3) -> pd.DataFrame:
    """The ``per_series`` slices with the highest `any` of each positive series."""
    positive = series.loc[series["flag"] == POSITIVE, list(SERIES_KEYS)]
    chosen = slices.merge(positive, on=list(SERIES_KEYS)).sort_values(
        [*SERIES_KEYS, ANY], ascending=[True, True, False], kind="stable")
    return chosen.groupby(list(SERIES_KEYS), sort=False).head(per_series)


def _png(fig: Figure) -> str:
    return png_src(png_bytes(fig, dpi=100))


def _image_png(rgb: np.ndarray) -> str:
    fig = Figure(figsize=(rgb.shape[1] / 100, rgb.shape[0] / 100))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgb)
    ax.axis("off")
    return _png(fig)


def _series_plot(s: pd.DataFrame, threshold: float) -> str:
    """The six probabilities along the series, slice by slice in its order."""
    fig = Figure(figsize=(7, 2.4), layout="constrained")
    ax = fig.subplots()
    for label in LABELS:
        ax.plot(s["index"], s[label], color=CLASS_COLORS[label], linewidth=2.2 if label == ANY else 1.2,
                marker="o" if len(s) < 40 else None, markersize=3, label=label)
    ax.axhline(threshold, color="#999999", linestyle="--", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("slice along the series (index)", fontsize=8)
    ax.set_ylabel("probability", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, ncols=6, loc="upper center", bbox_to_anchor=(0.5, 1.22), frameon=False)
    return _png(fig)


_STYLE = """body{font-family:system-ui,sans-serif;margin:0;background:#f6f6f6;color:#222}
main{max-width:1100px;margin:0 auto;padding:1.5rem 2rem;background:#fff}
h2{border-bottom:2px solid #ddd;margin-top:2rem}table{border-collapse:collapse;font-size:.85rem}
td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}.positive{color:#b00;font-weight:bold}
figure{display:inline-block;margin:.3rem;font-size:.75rem;max-width:260px}figure img{width:256px}
.note,.meta{color:#555}"""


def write_predict_html(path: str | PathLike, slices: pd.DataFrame, series: pd.DataFrame,
                       heatmaps: dict[str, tuple[str, np.ndarray]], *, threshold: float,
                       notes: list[str]) -> Path:
    """predict.html: the summary, then per series its table row, its probability plot and
    the heatmaps of its top slices (``heatmaps``: slice path -> (class, RGB overlay))."""
    parts = [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    for _, row in series.iterrows():
        s = slices[(slices["study_uid"] == row["study_uid"]) & (slices["series_uid"] == row["series_uid"])]
        s = s.sort_values("index", kind="stable")
        title = f"{row['series_description'] or 'series'} — {row['n_slices']} slices"
        figures = "".join(
            f"<figure><img alt='heatmap' src='{_image_png(heatmaps[p][1])}'>"
            f"<figcaption>{html.escape(p)}<br>{heatmaps[p][0]} {s.loc[s['path'] == p, heatmaps[p][0]].iloc[0]:.2f}"
            f"</figcaption></figure>" for p in s["path"] if p in heatmaps)
        cells = "".join(f"<td>{row[f'max_{k}']:.3f}</td>" for k in LABELS)
        parts.append(
            f"<h2>{html.escape(title)}</h2><p class='note'>study {html.escape(row['study_uid'])}<br>"
            f"series {html.escape(row['series_uid'])}</p><table><tr><th>flag</th>"
            + "".join(f"<th>max {k}</th>" for k in LABELS) + f"<th>slices over {threshold:g}</th></tr>"
            f"<tr><td class='{row['flag']}'>{row['flag']}</td>{cells}<td>{row['n_over_threshold']}</td></tr></table>"
            f"<img alt='probabilities along the series' src='{_series_plot(s, threshold)}'>"
            + (f"<div>{figures}</div>" if figures else ""))
    page = html_page("Predictions on your scans", _STYLE, "\n".join(parts),
                     meta=". Research use only: not a medical device.")
    return atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
