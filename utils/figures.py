"""The report's figures: labels, DICOM header survey, example slices, training curves,
reliability. Each takes tables or arrays and a path, writes one PNG (or CSV) and returns it.

Figures are drawn on matplotlib `Figure` objects, never through pyplot: the Agg canvas
renders them without a display, and the caller's backend (a notebook's inline one, say)
is left alone. Every file is written whole or not at all (utils.atomic).
"""
from __future__ import annotations

import io
import math
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from utils.atomic import atomic_write
from utils.calibration import N_BINS, check_predictions, expected_calibration_error, reliability
from utils.dicom import (DEFAULT_WINDOWS, EXPLICIT_LE, HEADER, IMPLICIT_LE, NAMED_WINDOWS, RLE_LOSSLESS,
                         DicomError, parse_windows, read_windowed, wraps_12bit)
from utils.labels import ANY, LABELS, SUBTYPES, check_label_table, label_report


def write_bytes(path: str | PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


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


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """A figure as PNG bytes on white: every picture of report.html and predict.html."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def _save_figure(fig: Figure, path: str | PathLike) -> Path:
    return write_bytes(path, png_bytes(fig))


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
    write_bytes(csv_path, buf.getvalue().encode())

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


def as_windows(windows) -> tuple:
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
    windows = as_windows(windows)
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
    windows = as_windows(windows)
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
