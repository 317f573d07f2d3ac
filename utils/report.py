"""The run report: what the data looks like, what the model sees, how training went.

    from utils.report import write_report
    write_report(out_dir, labels, headers)   # -> out_dir/report/: PNGs, dicom_headers.csv, report.html

Every input is optional: before training there is no history.csv, and the page says so
instead of failing. Only malformed input (a label table without the six columns, a header
table without its columns, unreadable JSON) raises.

Figures are drawn on matplotlib `Figure` objects, never through pyplot: the Agg canvas
renders them without a display, and the caller's backend (a notebook's inline one, say)
is left alone. Every file goes to a temporary file in its own folder and is renamed into
place, so an interrupted report never leaves half a PNG. report.html embeds its images as
data URIs and uses no external CSS, JS or fonts: one file that opens offline or by mail.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from utils import rundir
from utils.atomic import atomic_write
from utils.calibration import N_BINS, check_predictions, expected_calibration_error, reliability
from utils.dicom import (DEFAULT_WINDOWS, EXPLICIT_LE, HEADER, IMPLICIT_LE, NAMED_WINDOWS, RLE_LOSSLESS,
                         DicomError, parse_windows, read_windowed, scan_headers, wraps_12bit)
from utils.errors import UserError
from utils.labels import ANY, LABELS, SUBTYPES, check_image_id, check_label_table, label_report, read_labels

LOG = logging.getLogger(__name__)
REPORT_DIR = rundir.REPORT
LABELS_PNG = "labels.png"
HEADERS_CSV = "dicom_headers.csv"
HEADERS_PNG = "dicom_headers.png"
EXAMPLES_PNG = "examples.png"
TRAINING_PNG = "training.png"
REPORT_HTML = "report.html"
CONFIG_JSON, METRICS_JSON, HISTORY_CSV = rundir.CONFIG, rundir.METRICS, rundir.HISTORY

NORMAL = "normal"  # the examples row of slices without any hemorrhage
EXAMPLE_ROWS = (*LABELS, NORMAL)
SURVEY_COLUMNS = ("attribute", "value", "count")
HISTORY_REQUIRED = ("epoch", "train_loss", "val_loss")

DPI = 110  # a 10-inch figure is 1100 px: sharp in a browser, small enough to mail
MAX_BARS = 10  # values per header panel; rarer ones are summed into one "other" bar
EXAMPLE_INCHES = 1.25  # one slice of the examples grid
# Unreadable slices tried per examples row before it gives up: pixel data can fail to
# decode even after its header scanned cleanly, but a row should not read a whole folder.
MAX_READ_FAILURES = 20

_GREY = "#555555"
# One colour per class in every figure, so a class is recognised across panels.
CLASS_COLORS = dict(zip(EXAMPLE_ROWS, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                       _GREY, "#8c8c8c")))
_WINDOW_NAMES = {w: name for name, w in NAMED_WINDOWS.items()}
_SYNTAX_NAMES = {EXPLICIT_LE: "explicit VR little endian", IMPLICIT_LE: "implicit VR little endian",
                 RLE_LOSSLESS: "RLE lossless"}


# ---------------------------------------------------------------------------------------
# Files: written whole or not at all.

def _write_atomic(path: str | PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """A figure as PNG bytes on white: every picture of report.html and predict.html."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def png_src(png: bytes) -> str:
    """A PNG as an <img> source inside the page: the pages open offline, one file each."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def html_page(title: str, style: str, body: str, *, meta: str = "") -> str:
    """The page around ``body``: report.html's and predict.html's, its title as heading, then
    when it was written (and ``meta``)."""
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{style}</style></head>\n"
            f"<body><main><h1>{html.escape(title)}</h1><p class=\"meta\">Written {written}{meta}</p>\n"
            f"{body}\n</main></body></html>\n")


def _save_figure(fig: Figure, path: str | PathLike) -> Path:
    return _write_atomic(path, png_bytes(fig))


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _read_history(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()  # a zero-byte file: no epochs yet


# ---------------------------------------------------------------------------------------
# Bars with their counts written next to them: the exact numbers matter more than the
# lengths when one class is a hundred times rarer than another.

def _count_bars(ax, names: list[str], counts: list[int], total: int, colors, min_slots: int = 0) -> None:
    """Horizontal bars, first value on top, each labelled with its count and share.

    The counts are written out, so the x axis is left off. `min_slots` keeps bars of
    panels with one or two values as thin as those of fuller panels next to them.
    """
    y = np.arange(len(names))
    ax.barh(y, counts, color=colors, height=0.7)
    ax.set_yticks(y, names)
    ax.set_ylim(max(len(names), min_slots) - 0.5, -0.5)
    top = max(counts, default=0)
    ax.set_xlim(0, top * 1.5 if top else 1)  # room for the numbers right of the bars
    for yi, count in zip(y, counts):
        share = f" ({count / total:.1%})" if total else ""
        ax.text(count, yi, f" {count:,}{share}", va="center", fontsize=8)
    ax.xaxis.set_visible(False)
    ax.tick_params(labelsize=8)
    ax.spines[["top", "right", "bottom"]].set_visible(False)


def _note(ax, text: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, color=_GREY,
            transform=ax.transAxes)


# ---------------------------------------------------------------------------------------
# labels.png

def write_label_figure(labels: pd.DataFrame, path: str | PathLike) -> Path:
    """Bar charts of the positives per class and the number of subtypes per image."""
    report = label_report(labels)  # validates the table
    sections = dict(tuple(report.groupby("section", sort=False)))
    n = int(sections["images"]["count"].iloc[0])
    positives = sections["positives"]
    per_image = sections["subtypes_per_image"]

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1.15, 1))
    _count_bars(left, list(positives["name"]), [int(c) for c in positives["count"]], n,
                [CLASS_COLORS[k] for k in positives["name"]])
    left.set_title("Positive images per class", fontsize=10)
    _count_bars(right, list(per_image["name"]), [int(c) for c in per_image["count"]], n, _GREY)
    right.set_title("Hemorrhage subtypes per image ('any' not counted)", fontsize=10)
    right.set_ylabel("subtypes", fontsize=9)
    fig.suptitle(f"Labels of {n:,} images", fontsize=12)
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# dicom_headers.csv and dicom_headers.png

def _number(value) -> str:
    return "absent" if pd.isna(value) else f"{float(value):g}"


def _bits(bits_stored, pixel_representation) -> str:
    sign = {0: "unsigned", 1: "signed"}.get(int(pixel_representation),
                                            f"PixelRepresentation {pixel_representation}")
    return f"{int(bits_stored)} bits, {sign}"


def _windows_kind(multi_window, window_center) -> str:
    if pd.isna(window_center):
        return "absent"
    return "multi-valued" if bool(multi_window) else "single"


def _wrap(bits_stored, pixel_representation, rescale_intercept) -> str:
    wrapped = wraps_12bit(int(bits_stored), int(pixel_representation), rescale_intercept)
    return "yes" if wrapped else "no"


# (attribute, the header columns it is made of, their values -> one readable value).
# Values are counted on the raw columns first and formatted after, so the formatting runs
# once per distinct value, not once per file of the 750 000.
SURVEY = (
    ("image_size", ("rows", "columns"), lambda r, c: f"{int(r)}x{int(c)}"),
    ("bits_stored/pixel_representation", ("bits_stored", "pixel_representation"), _bits),
    ("rescale_intercept", ("rescale_intercept",), _number),
    ("rescale_slope", ("rescale_slope",), _number),
    ("12bit_wrap", ("bits_stored", "pixel_representation", "rescale_intercept"), _wrap),
    ("windows", ("multi_window", "window_center"), _windows_kind),
    ("pixel_spacing_mm", ("pixel_spacing",), lambda s: "absent" if pd.isna(s) else f"{float(s):.3f}"),
    ("photometric", ("photometric",), str),
    ("transfer_syntax", ("transfer_syntax",), lambda uid: _SYNTAX_NAMES.get(uid, str(uid))),
)
SURVEY_SOURCE_COLUMNS = tuple(dict.fromkeys(c for _, cols, _ in SURVEY for c in cols))


def header_survey(headers: pd.DataFrame) -> pd.DataFrame:
    """Counts of each header attribute's values: a tidy table `attribute,value,count`.

    One block of rows per attribute in SURVEY order, most common value first (ties by
    value). Each block's counts add up to the number of files.
    """
    if not isinstance(headers, pd.DataFrame):
        raise TypeError(f"expected a DataFrame of headers, got {type(headers).__name__}")
    missing = [c for c in SURVEY_SOURCE_COLUMNS if c not in headers.columns]
    if missing:
        raise ValueError(f"header table lacks the columns {missing} (expected scan_headers' output)")
    blocks = []
    for attribute, columns, fmt in SURVEY:
        raw = headers.value_counts(subset=list(columns), dropna=False, sort=False)
        counts = pd.Series(raw.to_numpy(), index=[fmt(*key) for key in raw.index], dtype="int64")
        counts = counts.groupby(level=0).sum()
        block = pd.DataFrame({"attribute": attribute, "value": counts.index, "count": counts.to_numpy()})
        blocks.append(block.sort_values(["count", "value"], ascending=[False, True], kind="stable"))
    table = pd.concat(blocks, ignore_index=True)
    return table.astype({"attribute": "str", "value": "str", "count": "int64"})[list(SURVEY_COLUMNS)]


def _top_values(block: pd.DataFrame) -> tuple[list[str], list[int]]:
    names, counts = list(block["value"]), [int(c) for c in block["count"]]
    if len(names) > MAX_BARS:
        rest = len(names) - MAX_BARS + 1
        names = names[:MAX_BARS - 1] + [f"other ({rest} values)"]
        counts = counts[:MAX_BARS - 1] + [sum(counts[MAX_BARS - 1:])]
    return names, counts


def write_header_survey(headers: pd.DataFrame, csv_path: str | PathLike,
                        png_path: str | PathLike) -> pd.DataFrame:
    """Write header_survey's table as CSV and one bar chart per attribute; return the table."""
    survey = header_survey(headers)
    n = len(headers)
    buf = io.StringIO()
    survey.to_csv(buf, index=False)
    _write_atomic(csv_path, buf.getvalue().encode())

    panels = [(attribute, columns, _top_values(survey[survey["attribute"] == attribute]))
              for attribute, columns, _ in SURVEY]
    n_cols = 3
    rows = [panels[i:i + n_cols] for i in range(0, len(panels), n_cols)]
    # A row of panels is as tall as its longest list of values, so bars keep one thickness.
    slots = [max(2, *(len(names) for _, _, (names, _) in row)) for row in rows]
    fig = Figure(figsize=(13, 0.3 * sum(slots) + 0.65 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), n_cols, height_ratios=slots, squeeze=False)
    for r, row in enumerate(rows):
        for ax, (attribute, columns, (names, counts)) in zip(axes[r], row):
            source = "" if columns == (attribute,) else f"  ({', '.join(columns)})"
            ax.set_title(attribute + source, fontsize=9)
            if names:
                _count_bars(ax, names, counts, n, "#4c72b0", min_slots=slots[r])
            else:
                _note(ax, "no files")
        for ax in axes[r, len(row):]:
            ax.set_axis_off()
    fig.suptitle(f"DICOM headers of {n:,} readable files", fontsize=12)
    _save_figure(fig, png_path)
    return survey


# ---------------------------------------------------------------------------------------
# examples.png

def _as_windows(windows) -> tuple:
    if windows is None:
        return DEFAULT_WINDOWS
    return parse_windows(windows) if isinstance(windows, str) else tuple(windows)


def window_title(w) -> str:
    """'brain 40/80' for a named window, '55/150' for another, 'header window' for the file's own."""
    if w == HEADER:
        return "header window"
    center, width = float(w[0]), float(w[1])
    name = _WINDOW_NAMES.get((center, width))
    numbers = f"{center:g}/{width:g}"
    return f"{name.replace('_', ' ')} {numbers}" if name else numbers


def _as_paths(paths_by_id) -> pd.Series:
    paths = pd.Series(paths_by_id).astype(object).dropna()
    return paths[~paths.index.duplicated()]


def example_candidates(labels: pd.DataFrame, available, seed: int = 0) -> dict[str, list[str]]:
    """Per examples row (each label, then NORMAL): its image IDs in the order to try them.

    Only IDs in `available` count. The order is random for a given seed; a subtype's row
    tries the images positive for that subtype alone first, so the slice shows it and
    not another kind of bleed next to it.
    """
    values = check_label_table(labels)
    usable = labels.index.isin(available)
    n_subtypes = values[:, :ANY].sum(axis=1)
    rng = np.random.default_rng(seed)
    out = {}
    for row in EXAMPLE_ROWS:
        if row == NORMAL:
            tiers = [usable & (values[:, ANY] == 0)]
        else:
            positive = usable & (values[:, LABELS.index(row)] == 1)
            tiers = [positive & (n_subtypes == 1), positive & (n_subtypes != 1)] \
                if row in SUBTYPES else [positive]
        order = np.concatenate([rng.permutation(np.flatnonzero(tier)) for tier in tiers])
        out[row] = list(labels.index[order])
    return out


def pick_examples(labels: pd.DataFrame, paths_by_id, windows, per_class: int = 3, size: int = 128,
                  seed: int = 0) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Per examples row: up to `per_class` (image ID, windowed uint8 (size, size, C) image).

    Slices that fail to read are skipped; a row with no positives comes back empty.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    paths = _as_paths(paths_by_id)
    windows = _as_windows(windows)
    picked = {}
    for row, ids in example_candidates(labels, paths.index, seed).items():
        images, failures = [], 0
        for image_id in ids:
            if len(images) == per_class or failures == MAX_READ_FAILURES:
                break
            try:
                images.append((image_id, read_windowed(paths[image_id], windows, size)))
            except (DicomError, OSError):
                failures += 1
        picked[row] = images
    return picked


def write_examples(labels: pd.DataFrame, paths_by_id, windows, path: str | PathLike,
                   per_class: int = 3, size: int = 128, seed: int = 0) -> Path:
    """A grid of example slices: a row per class (and normal), a column per window.

    Each example is shown once per window, as the single channel the model gets for it;
    the ID of the slice is written under its first window. `paths_by_id` maps image ID
    to DICOM path (a Mapping or Series); `windows` is a spec such as
    "brain,subdural,soft_tissue" or a tuple of (center, width).
    """
    windows = _as_windows(windows)
    picked = pick_examples(labels, paths_by_id, windows, per_class, size, seed)
    positives = {row: int(labels[row].sum()) if row != NORMAL else int((labels["any"] == 0).sum())
                 for row in EXAMPLE_ROWS}
    n_win = len(windows)
    # Axes are placed by hand, in inches: a layout engine spends seconds on a grid this
    # size, and fixed gaps keep an example's windows visibly together.
    cell, pad, group_gap, row_gap = EXAMPLE_INCHES, 0.05, 0.3, 0.3
    left, right, top, bottom = 1.5, 0.15, 0.85, 0.25  # bottom: the last row's image IDs
    group = n_win * cell + (n_win - 1) * pad
    width = max(left + per_class * group + (per_class - 1) * group_gap + right, 7.5)  # room for the title
    height = top + len(EXAMPLE_ROWS) * (cell + row_gap) - row_gap + bottom
    fig = Figure(figsize=(width, height))

    def cell_axes(r: int, e: int, w: int):
        x = left + e * (group + group_gap) + w * (cell + pad)
        y = height - top - r * (cell + row_gap) - cell
        ax = fig.add_axes((x / width, y / height, cell / width, cell / height))
        ax.set_xticks([])
        ax.set_yticks([])
        return ax

    for r, row in enumerate(EXAMPLE_ROWS):
        y_mid = 1 - (top + r * (cell + row_gap) + cell / 2) / height
        fig.text((left - 0.12) / width, y_mid, f"{row}\n{positives[row]:,} images", ha="right", va="center",
                 fontsize=10, color=CLASS_COLORS[row])
        images = picked[row]
        if not images:
            reason = "no positive images" if positives[row] == 0 else "no readable slice among them"
            fig.text((left + 0.1) / width, y_mid, reason, va="center", fontsize=10, color=_GREY)
        for e, (image_id, img) in enumerate(images):
            for w in range(n_win):
                ax = cell_axes(r, e, w)
                ax.imshow(img[:, :, w], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.spines[:].set_color(CLASS_COLORS[row])
                if w == 0:
                    ax.set_xlabel(image_id, fontsize=7, color=_GREY, labelpad=2)
    for e in range(per_class):
        for w in range(n_win):
            x_mid = left + e * (group + group_gap) + w * (cell + pad) + cell / 2
            fig.text(x_mid / width, 1 - (top - 0.08) / height, window_title(windows[w]), ha="center",
                     va="bottom", fontsize=8)
    fig.suptitle(f"Example slices per class, each shown in every window channel ({size}x{size})",
                 y=1 - 0.12 / height, va="top", fontsize=12)
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# training.png

def _per_class_panel(ax, history: pd.DataFrame, prefix: str, title: str) -> None:
    columns = [(k, f"{prefix}{k}") for k in LABELS if f"{prefix}{k}" in history.columns]
    if not columns:
        _note(ax, f"{title}: not recorded")
        return
    for k, column in columns:
        ax.plot(history["epoch"], history[column], marker="o", markersize=3, color=CLASS_COLORS[k],
                linewidth=2.2 if k == "any" else 1.4, label=k)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncols=2)


def _training_section(out_dir: Path, history: pd.DataFrame | None, metrics: dict) -> Path | str:
    """The training figure (one curve per fold for a --fold all run), or why it is missing."""
    path = out_dir / REPORT_DIR / TRAINING_PNG
    folds = {int(f.name.split("_")[1]): _read_history(f / HISTORY_CSV)
             for f in rundir.fold_dirs(out_dir) if (f / HISTORY_CSV).is_file()}
    if history is None and folds:
        return write_folds_figure(folds, path, metrics)
    if history is None or history.empty:
        why = f"no {HISTORY_CSV} in {out_dir} yet" if history is None else f"{HISTORY_CSV} has no epochs yet"
        return f"Not drawn: {why}; the report was written before the first epoch finished."
    prior = metrics.get("prior_weighted_log_loss")
    return write_training_figure(history, path, prior if isinstance(prior, (int, float)) else None)


def _epoch_axis(ax) -> None:
    ax.set_xlabel("epoch", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def write_folds_figure(histories: dict[int, pd.DataFrame], path: str | PathLike, metrics: dict) -> Path:
    """Each fold's training and validation loss per epoch, with the out-of-fold loss of
    the folds together and the constant prior's (from a --fold all run's metrics)."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    train_ax, val_ax = fig.subplots(1, 2)
    for fold, history in sorted(histories.items()):
        if history is None or history.empty:
            continue
        train_ax.plot(history["epoch"], history["train_loss"], marker="o", markersize=3, label=f"fold {fold}")
        val_ax.plot(history["epoch"], history["val_loss"], marker="o", markersize=3, label=f"fold {fold}")
    for key, text, style in (("weighted_log_loss_per_slice", "out of fold, all folds", "-"),
                             ("prior_weighted_log_loss", "constant prior", "--")):
        if isinstance(metrics.get(key), (int, float)):
            val_ax.axhline(metrics[key], color=_GREY, linestyle=style, linewidth=1,
                           label=f"{text} {metrics[key]:.4f}")
    for ax, title in ((train_ax, "Training loss"), (val_ax, "Validation weighted log loss")):
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        _epoch_axis(ax)
    fig.suptitle(f"Training: {len(histories)} folds", fontsize=12)
    return _save_figure(fig, path)


def write_training_figure(history: pd.DataFrame, path: str | PathLike,
                          prior_loss: float | None = None) -> Path:
    """Losses per epoch, per-class validation log loss and AUC, and the learning rate.

    `history` is history.csv's table; it needs the columns epoch, train_loss and val_loss
    and at least one row. `prior_loss` (the constant-prior weighted log loss) is drawn as
    the line a model has to beat.
    """
    if not isinstance(history, pd.DataFrame):
        raise TypeError(f"expected a DataFrame of history, got {type(history).__name__}")
    missing = [c for c in HISTORY_REQUIRED if c not in history.columns]
    if missing:
        raise ValueError(f"history lacks the columns {missing}; found {list(history.columns)}")
    if history.empty:
        raise ValueError("history has no epochs to draw")
    history = history.sort_values("epoch", kind="stable")

    fig = Figure(figsize=(12, 7.5), layout="constrained")
    (loss_ax, lr_ax), (class_ax, auc_ax) = fig.subplots(2, 2)
    loss_ax.plot(history["epoch"], history["train_loss"], marker="o", markersize=3, label="train")
    loss_ax.plot(history["epoch"], history["val_loss"], marker="o", markersize=3,
                 label="validation (weighted log loss)")
    if prior_loss is not None and math.isfinite(prior_loss):
        loss_ax.axhline(prior_loss, color=_GREY, linestyle="--", linewidth=1,
                        label=f"constant prior {prior_loss:.4f}")
    if history["val_loss"].notna().any():
        best = history.loc[history["val_loss"].idxmin()]
        loss_ax.plot(best["epoch"], best["val_loss"], "*", color="#d62728", markersize=12,
                     label=f"best: epoch {int(best['epoch'])}, {best['val_loss']:.4f}")
    loss_ax.set_title("Loss", fontsize=10)
    loss_ax.legend(fontsize=8)
    _per_class_panel(class_ax, history, "val_loss_", "Validation log loss per class")
    _per_class_panel(auc_ax, history, "val_auc_", "Validation AUC per class")
    if "lr" in history.columns:
        lr_ax.plot(history["epoch"], history["lr"], marker="o", markersize=3, color=_GREY)
        lr_ax.set_title("Learning rate at the end of the epoch", fontsize=10)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        _note(lr_ax, "learning rate: not recorded")
    for ax in (loss_ax, lr_ax, class_ax, auc_ax):
        if ax.axison:
            _epoch_axis(ax)
    fig.suptitle(f"Training: {len(history)} epoch{'' if len(history) == 1 else 's'}", fontsize=12)
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# reliability.png

RELIABILITY_PNG = "reliability.png"


def _reliability_panel(ax, y: np.ndarray, p: np.ndarray, label: str, n_bins: int) -> None:
    table = reliability(y, p, n_bins)
    filled = table[table["count"] > 0]
    ax.plot((0, 1), (0, 1), color=_GREY, linestyle="--", linewidth=1, label="perfectly calibrated")
    ax.plot(filled["mean_predicted"], filled["observed"], color=CLASS_COLORS[label], linewidth=1.4)
    # Marker area grows with the bin's share of the images: a bin of five images that
    # misses the diagonal by far matters less than the crowded bin near 0.
    sizes = 15 + 285 * filled["count"] / filled["count"].max()
    ax.scatter(filled["mean_predicted"], filled["observed"], s=sizes, color=CLASS_COLORS[label],
               edgecolors="white", linewidths=0.5, zorder=3, clip_on=False)
    for x, obs, count in zip(filled["mean_predicted"], filled["observed"], filled["count"]):
        ax.annotate(f"{int(count):,}", (x, obs), xytext=(4, -9), textcoords="offset points",
                    fontsize=6, color=_GREY)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_title(f"{label}: ECE {expected_calibration_error(y, p, n_bins):.4f}", fontsize=10)
    ax.set_xlabel("mean predicted probability", fontsize=8)
    ax.set_ylabel("observed frequency", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _calibration_section(out_dir: Path) -> Path | str:
    """The reliability figure of what the run submitted on its validation (or out-of-fold)
    images: rundir.validation_predictions."""
    if not any((out_dir / n).is_file() for n in (rundir.VAL_PREDICTIONS, rundir.OOF_PREDICTIONS)):
        return (f"Not drawn: no validation predictions yet ({rundir.VAL_PREDICTIONS} or "
                f"{rundir.OOF_PREDICTIONS}).")
    table = rundir.validation_predictions(out_dir)
    return write_reliability_figure(table[list(LABELS)].to_numpy(), table[rundir.PRED_COLUMNS].to_numpy(),
                                    out_dir / REPORT_DIR / RELIABILITY_PNG)


def write_reliability_figure(y, p, path: str | PathLike, *, n_bins: int = N_BINS,
                             title: str | None = None) -> Path:
    """A reliability diagram per class (2 x 3 panels): observed frequency against mean
    prediction in `n_bins` equal-width bins, the diagonal, and the ECE in each title.

    `y` (n, 6) labels and `p` (n, 6) predictions in LABELS order, e.g. the validation or
    out-of-fold ones. Each marker is a non-empty bin, sized and labelled by its count.
    """
    truth, pred = check_predictions(y, p)
    fig = Figure(figsize=(12, 8.4), layout="constrained")
    for j, (label, ax) in enumerate(zip(LABELS, fig.subplots(2, 3).ravel())):
        _reliability_panel(ax, truth[:, j], pred[:, j], label, n_bins)
    fig.axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title or f"Calibration of {len(truth):,} images: observed frequency against "
                          f"mean prediction, {n_bins} bins", fontsize=12)
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# report.html

_CAPTIONS = {
    LABELS_PNG: "How many images are positive for each class, and how many subtypes an image has. "
                "The competition weights 'any' twice in its log loss.",
    HEADERS_PNG: "The technical survey of the DICOM files: the header variants the reader has to handle. "
                 "'12bit_wrap' counts files whose negative HU wrap around (12 stored bits, unsigned, "
                 "intercept near 0) and are unwrapped when read.",
    EXAMPLES_PNG: "What the model sees: each example slice once per window, each window one input "
                  "channel. The outline colour is the row's class.",
    RELIABILITY_PNG: "How far to trust the probabilities: for the validation (or out-of-fold) "
                     "images, the share that is truly positive against the mean predicted "
                     "probability, in ten bins. On the diagonal, a predicted 0.3 is right 30 % of "
                     "the time. ECE: the gap averaged over images. --calibrate fits a temperature "
                     "per class and keeps it only where it lowers the loss out of fold.",
    TRAINING_PNG: "Loss per epoch (the star marks the checkpoint kept), per-class validation log "
                  "loss and AUC, and the learning rate.",
}

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       background: #f6f6f6; color: #222; }
main { max-width: 1400px; margin: 0 auto; padding: 1.5rem 2rem 3rem; background: #fff; }
h1 { margin-bottom: 0.2rem; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2rem; margin-top: 2.2rem; }
.meta, .caption { color: #555; font-size: 0.9rem; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.6rem 0.9rem; }
.headline { font-size: 1.3rem; margin: 0.6rem 0; }
figure { margin: 0.6rem 0; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.6rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; }
nav a { margin-right: 1rem; }
"""


def _format_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        # Losses differ in the fourth decimal; seconds and sizes do not need five.
        return f"{value:.5f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _cell(value) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{html.escape(_format_value(value))}</td>' if numeric \
        else f"<td>{html.escape(_format_value(value))}</td>"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_VALIDATED_ON = {"validation": "Validation", "out_of_fold": "Out-of-fold",
                 "shared_validation": "Blend's validation"}


def _metrics_html(metrics: Mapping | None) -> str:
    if not metrics:
        return '<p class="note">No metrics.json yet: the run has not finished training.</p>'
    parts = []
    val, prior = metrics.get("weighted_log_loss"), metrics.get("prior_weighted_log_loss")
    if isinstance(val, (int, float)):
        where = _VALIDATED_ON.get(metrics.get("validated_on"), "Validation")
        line = f"{where} weighted log loss <b>{html.escape(_format_value(float(val)))}</b>"
        if isinstance(prior, (int, float)) and prior > 0:
            change = val / prior - 1
            line += (f" against {html.escape(_format_value(float(prior)))} for the constant prior "
                     f"({abs(change):.1%} {'lower' if change <= 0 else 'higher'})")
        parts.append(f'<p class="headline">{line}</p>')
    # A dict keyed by label is one column of the per-class table; everything else is a scalar.
    per_class = {k: v for k, v in metrics.items() if isinstance(v, Mapping) and set(v) <= set(LABELS)}
    if per_class:
        rows = [[label] + [per_class[k].get(label) for k in per_class] for label in LABELS]
        parts.append(_table(["class", *per_class], rows))
    scalars = [[k, v] for k, v in metrics.items() if k not in per_class]
    if scalars:
        parts.append(_table(["metric", "value"], scalars))
    return "\n".join(parts)


def _figure_html(figure: Path | str) -> str:
    if isinstance(figure, str):  # a note why the figure is not there
        return f'<p class="note">{html.escape(figure)}</p>'
    data = png_src(Path(figure).read_bytes())
    caption = _CAPTIONS.get(Path(figure).name, "")
    return (f'<figure><img src="{data}" alt="{html.escape(Path(figure).name)}">'
            f'<figcaption class="caption">{html.escape(caption)}</figcaption></figure>')


def _survey_html(survey: pd.DataFrame | None) -> str:
    if survey is None or survey.empty:
        return ""
    rows = [[a, v, int(c)] for a, v, c in survey.itertuples(index=False)]
    return (f"<details><summary>All values ({HEADERS_CSV})</summary>"
            f"{_table(list(SURVEY_COLUMNS), rows)}</details>")


def write_html(path: str | PathLike, figures: Mapping[str, Path | str], *, config: Mapping | None = None,
               metrics: Mapping | None = None, survey: pd.DataFrame | None = None,
               title: str = "Run report") -> Path:
    """One self-contained page: metrics, then a section per figure, then the settings.

    `figures` maps a section heading to a PNG (embedded as a data URI) or to a note that
    says why there is no figure. `survey` (header_survey's table) is listed in full under
    the section that shows dicom_headers.png.
    """
    nav = " ".join(f'<a href="#s{i}">{html.escape(h)}</a>'
                   for i, h in enumerate(["Metrics", *figures, "Settings"]))
    sections = [f'<section id="s0"><h2>Metrics</h2>{_metrics_html(metrics)}</section>']
    for i, (heading, figure) in enumerate(figures.items(), start=1):
        extra = _survey_html(survey) if isinstance(figure, Path) and figure.name == HEADERS_PNG else ""
        sections.append(f'<section id="s{i}"><h2>{html.escape(heading)}</h2>{_figure_html(figure)}{extra}</section>')
    settings = _table(["setting", "value"], [[k, v] for k, v in config.items()]) if config \
        else '<p class="note">No config.json in the run folder.</p>'
    sections.append(f'<section id="s{len(figures) + 1}"><h2>Settings</h2>{settings}</section>')
    page = html_page(title, _STYLE, f"<nav>{nav}</nav>\n" + "\n".join(sections))
    return _write_atomic(path, page.encode("utf-8"))


# ---------------------------------------------------------------------------------------
# Everything at once.

def _paths_from_headers(headers: pd.DataFrame) -> pd.Series:
    if "path" not in headers.columns:
        raise ValueError("header table lacks the column 'path'")
    # scan_headers returns image_id as a column; kernel.py's frames have it as the index.
    ids = headers["image_id"] if "image_id" in headers.columns else headers.index
    return pd.Series(headers["path"].to_numpy(), index=pd.Index(ids, dtype=object), dtype=object)


def write_report(out_dir: str | PathLike, labels: pd.DataFrame | None = None,
                 headers: pd.DataFrame | None = None, image_paths=None, windows=None, *,
                 per_class: int = 3, size: int = 128, seed: int = 0) -> list[Path]:
    """Write every figure that its inputs allow and report.html into out_dir/report/.

    config.json, metrics.json and history.csv are read from `out_dir` when present.
    `image_paths` (image ID -> DICOM path) defaults to the headers' `path` column;
    `windows` defaults to config.json's, then to DEFAULT_WINDOWS. Returns the files
    written, report.html last.
    """
    out_dir = Path(out_dir)
    report_dir = out_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    config = _read_json(out_dir / CONFIG_JSON)
    metrics = _read_json(out_dir / METRICS_JSON)
    history = _read_history(out_dir / HISTORY_CSV)
    if windows is None and config and config.get("windows"):
        windows = config["windows"]
    windows = _as_windows(windows)
    if image_paths is None and headers is not None:
        image_paths = _paths_from_headers(headers)

    # Sections in reading order: how training went, then the data it learned from.
    written, figures, survey = [], {}, None
    figures["Training"] = _training_section(out_dir, history, metrics or {})
    if isinstance(figures["Training"], Path):
        written.append(figures["Training"])
    figures["Calibration"] = _calibration_section(out_dir)
    if isinstance(figures["Calibration"], Path):
        written.append(figures["Calibration"])

    if labels is None:
        figures["Labels"] = "Not drawn: no label table was given."
    else:
        figures["Labels"] = write_label_figure(labels, report_dir / LABELS_PNG)
        written.append(figures["Labels"])

    if labels is None or image_paths is None:
        figures["What the model sees"] = "Not drawn: examples need both the labels and the image paths."
    else:
        figures["What the model sees"] = write_examples(labels, image_paths, windows, report_dir / EXAMPLES_PNG,
                                                        per_class=per_class, size=size, seed=seed)
        written.append(figures["What the model sees"])

    if headers is None:
        figures["DICOM headers"] = "Not drawn: no header scan was given."
    else:
        survey = write_header_survey(headers, report_dir / HEADERS_CSV, report_dir / HEADERS_PNG)
        figures["DICOM headers"] = report_dir / HEADERS_PNG
        written += [report_dir / HEADERS_CSV, report_dir / HEADERS_PNG]

    title = f"Run report: {out_dir.resolve().name}"
    written.append(write_html(report_dir / REPORT_HTML, figures, config=config, metrics=metrics,
                              survey=survey, title=title))
    return written


def write_run_report(out_dir: Path, labels: pd.DataFrame, headers: list[pd.DataFrame], windows: str) -> None:
    """The report at the end of a run; a failure here is logged, never allowed to fail a run
    whose submission is already written."""
    try:
        files = write_report(out_dir, labels, pd.concat(headers), windows=windows)
        LOG.info(f"Report: {out_dir / REPORT_DIR / REPORT_HTML} ({len(files)} files)")
    except Exception as err:  # noqa: BLE001 - the report is a by-product
        LOG.info(f"Report not written: {type(err).__name__}: {err}")


def report_command(out_dir: str | None, data_dir: str | None, windows: str, workers: int,
                   header_cache: str | None) -> int:
    """--report: (re)draw the report of the run in ``out_dir`` (or of the data alone)."""
    if not out_dir:
        raise UserError("--report needs --out-dir, the folder of a run (or where to put the report)")
    out = Path(out_dir)
    config = _read_json(out / CONFIG_JSON) or {}
    data = Path(config.get("data_dir") or data_dir or "")
    if not (data / "stage_2_train.csv").is_file():
        raise UserError(f"--report found no data: {out} holds no run's config.json naming it; pass --data-dir")
    out.mkdir(parents=True, exist_ok=True)
    labels = read_labels(data / "stage_2_train.csv")
    paths = [data / "stage_2_train" / f"{check_image_id(i)}.dcm" for i in labels.index]
    headers, _ = scan_headers([p for p in paths if p.is_file()], workers=workers,
                              cache=rundir.header_cache(header_cache, out, data, "train"))
    for path in write_report(out, labels, headers.set_index("image_id"), windows=config.get("windows", windows)):
        LOG.info(f"wrote {path}")
    return 0
