"""What `kernel.py --predict DIR` writes besides slices.csv: one row per series, and
predict.html, an offline page that opens with one table of every series (positive first,
each row a link to its section) and then, per series, its files, its probabilities along
its slices and the Grad-CAM heatmaps of its highest-scoring slices.

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
from utils.figures import CLASS_COLORS, png_bytes
from utils.labels import ANY as ANY_INDEX
from utils.labels import LABELS
from utils.report import html_page, png_src

SERIES_KEYS = ("study_uid", "series_uid")
ANY = LABELS[ANY_INDEX]
POSITIVE, NEGATIVE = "positive", "negative"  # series.csv's flag: is `any` over the threshold anywhere
MAX_FILES_LISTED = 5  # a section names this many of its files, then "…"


def series_table(slices: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """One row per (study, series) of the predicted slices: its description and size, its
    formats and how many files it came from, the maximum probability of each class and the
    path of the slice where it occurs, how many slices have `any` over ``threshold``, and a
    one-word flag. Slices without `file`/`format` columns (older tables) count their distinct
    paths as files and have no format."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    rows = []
    for (study, series), s in slices.groupby(list(SERIES_KEYS), sort=True):
        row = {"study_uid": study, "series_uid": series,
               "series_description": s["series_description"].iloc[0], "n_slices": len(s),
               "format": "; ".join(_formats(s)), "files": len(_files(s))}
        for label in LABELS:
            top = s[label].idxmax()
            row[f"max_{label}"] = float(s.at[top, label])
            row[f"at_{label}"] = s.at[top, "path"]
        row["n_over_threshold"] = int((s[ANY] > threshold).sum())
        row["flag"] = POSITIVE if row["n_over_threshold"] else NEGATIVE
        rows.append(row)
    columns = [*SERIES_KEYS, "series_description", "n_slices", "format", "files",
               *(f"{p}_{k}" for k in LABELS for p in ("max", "at")), "n_over_threshold", "flag"]
    return pd.DataFrame(rows, columns=columns)


def _formats(s: pd.DataFrame) -> list[str]:
    """The distinct formats of a series' slices, sorted; none when the table has no `format`."""
    if "format" not in s:
        return []
    return sorted({str(f) for f in s["format"].dropna() if str(f)})


def _files(s: pd.DataFrame) -> list[str]:
    """The distinct files of a series' slices, sorted; a slice's path stands for its file in
    tables without `file` (one slice per file)."""
    return sorted({str(f) for f in s["file" if "file" in s else "path"].dropna()})


def top_slices(slices: pd.DataFrame, series: pd.DataFrame, per_series: int = 3) -> pd.DataFrame:
    """The ``per_series`` slices with the highest `any` of each positive series."""
    positive = series.loc[series["flag"] == POSITIVE, list(SERIES_KEYS)]
    chosen = slices.merge(positive, on=list(SERIES_KEYS)).sort_values(
        [*SERIES_KEYS, ANY], ascending=[True, True, False], kind="stable")
    return chosen.groupby(list(SERIES_KEYS), sort=False).head(per_series)


def _png(fig: Figure) -> str:
    return png_src(png_bytes(fig, dpi=100))


def image_png(rgb: np.ndarray) -> str:
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
table.summary td.num{text-align:right;font-variant-numeric:tabular-nums}caption{text-align:left;padding:.3rem 0}
figure{display:inline-block;margin:.3rem;font-size:.75rem;max-width:260px}figure img{width:256px}
.note,.meta{color:#555}"""


def _plain(value) -> str:
    """A cell as text: a missing one (None, or NaN as an empty description read from a CSV) is ""."""
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def _text(value) -> str:
    return html.escape(_plain(value))


def _triage_order(series: pd.DataFrame) -> pd.DataFrame:
    """The series as the page lists them: positive first, then by maximum `any`, highest
    first, then by study and series UID so that ties keep one order."""
    key = series.assign(_negative=series["flag"] != POSITIVE)
    key = key.sort_values(["_negative", f"max_{ANY}", *SERIES_KEYS], ascending=[True, False, True, True],
                          kind="stable")
    return key.drop(columns="_negative").reset_index(drop=True)


def _summary_table(ordered: pd.DataFrame, threshold: float) -> str:
    """One row per series in ``ordered``; row i (from 1) links to the section `s-i`."""
    n_positive = int((ordered["flag"] == POSITIVE).sum())
    head = "".join(f"<th>{h}</th>" for h in ("#", "study UID", "series description", "format", "slices",
                                             "flag", *(f"max {html.escape(k)}" for k in LABELS)))
    rows = []
    for number, (_, row) in enumerate(ordered.iterrows(), 1):
        probs = "".join(f"<td class='num'>{row[f'max_{k}']:.3f}</td>" for k in LABELS)
        rows.append(f"<tr><td>{number}</td><td>{_text(row['study_uid'])}</td>"
                    f"<td><a href='#s-{number}'>{_text(row['series_description']) or '(no description)'}</a></td>"
                    f"<td>{_text(row.get('format'))}</td><td class='num'>{int(row['n_slices'])}</td>"
                    f"<td class='{_text(row['flag'])}'>{_text(row['flag'])}</td>{probs}</tr>")
    return (f"<table class='summary'><caption>{len(ordered)} series, {n_positive} positive "
            f"(<code>{html.escape(ANY)}</code> over {threshold:g} in a slice)</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _sources(s: pd.DataFrame, series_format: str) -> str:
    """Which file(s) a series came from and their format: the file when one, else how many
    and the first few."""
    files = _files(s)
    if len(files) == 1:
        named = f"file {html.escape(files[0])}"
    else:
        shown = ", ".join(html.escape(f) for f in files[:MAX_FILES_LISTED])
        named = f"{len(files)} files: {shown}{', …' if len(files) > MAX_FILES_LISTED else ''}"
    return f"{named}<br>format {html.escape(series_format) if series_format else 'not recorded'}"


def _section(number: int, row: pd.Series, s: pd.DataFrame,
             heatmaps: dict[str, tuple[str, np.ndarray]], threshold: float) -> str:
    """Series ``number`` of the summary: its title, UIDs and files, its table row, its
    probability plot and the heatmaps of its slices in ``heatmaps``."""
    s = s.sort_values("index", kind="stable")
    title = f"{number}. {_text(row['series_description']) or 'series'} — {int(row['n_slices'])} slices"
    figures = "".join(
        f"<figure><img alt='heatmap' src='{image_png(heatmaps[p][1])}'>"
        f"<figcaption>{html.escape(p)}<br>{html.escape(heatmaps[p][0])} "
        f"{s.loc[s['path'] == p, heatmaps[p][0]].iloc[0]:.2f}</figcaption></figure>"
        for p in s["path"] if p in heatmaps)
    cells = "".join(f"<td>{row[f'max_{k}']:.3f}</td>" for k in LABELS)
    return (
        f"<section id='s-{number}'><h2>{title}</h2><p class='note'>study {_text(row['study_uid'])}<br>"
        f"series {_text(row['series_uid'])}<br>{_sources(s, _plain(row.get('format')))}"
        f"</p><table><tr><th>flag</th>" + "".join(f"<th>max {html.escape(k)}</th>" for k in LABELS)
        + f"<th>slices over {threshold:g}</th></tr><tr><td class='{_text(row['flag'])}'>{_text(row['flag'])}</td>"
        f"{cells}<td>{int(row['n_over_threshold'])}</td></tr></table>"
        f"<img alt='probabilities along the series' src='{_series_plot(s, threshold)}'>"
        + (f"<div>{figures}</div>" if figures else "") + "</section>")


def write_predict_html(path: str | PathLike, slices: pd.DataFrame, series: pd.DataFrame,
                       heatmaps: dict[str, tuple[str, np.ndarray]], *, threshold: float,
                       notes: list[str]) -> Path:
    """predict.html: the notes, one table of every series (positive first, then by maximum
    `any`), then one section per series in the table's order, each row linking to its
    section: the series' files, table row, probability plot and the heatmaps of its top
    slices (``heatmaps``: slice path -> (class, RGB overlay))."""
    ordered = _triage_order(series)
    groups = dict(iter(slices.groupby(list(SERIES_KEYS), sort=False)))
    parts = [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts.append(_summary_table(ordered, threshold))
    for number, (_, row) in enumerate(ordered.iterrows(), 1):
        s = groups[(row["study_uid"], row["series_uid"])]
        parts.append(_section(number, row, s, heatmaps, threshold))
    page = html_page("Predictions on your scans", _STYLE, "\n".join(parts),
                     meta=". Research use only: not a medical device.")
    return atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
