"""The run report: what the data looks like, what the model sees, how training went.

    from utils.report import write_report
    write_report(out_dir, labels, headers)   # -> out_dir/report/: PNGs, dicom_headers.csv, report.html

Every input is optional: before training there is no history.csv, and the page says so
instead of failing. Only malformed input (a label table without the six columns, a header
table without its columns, unreadable JSON) raises.

This module reads the run folder and writes the page; the figures are utils.figures'.
Every file goes to a temporary file in its own folder and is renamed into place, so an
interrupted report never leaves half a PNG. report.html (and predict.html, through
html_page and png_src) embeds its images as data URIs and uses no external CSS, JS or
fonts: one file that opens offline or by mail.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path

import pandas as pd

from utils import rundir
from utils.errors import UserError
from utils.figures import (SURVEY_COLUMNS, SURVEY_SOURCE_COLUMNS, as_windows, write_bytes, write_examples, write_folds_figure,
                           write_header_survey, write_label_figure, write_reliability_figure,
                           write_training_figure)
from utils.headers import scan_headers
from utils.labels import LABELS, check_image_id, read_labels

LOG = logging.getLogger(__name__)
REPORT_DIR = rundir.REPORT
LABELS_PNG = "labels.png"
HEADERS_CSV = "dicom_headers.csv"
HEADERS_PNG = "dicom_headers.png"
EXAMPLES_PNG = "examples.png"
TRAINING_PNG = "training.png"
RELIABILITY_PNG = "reliability.png"
REPORT_HTML = "report.html"
CONFIG_JSON, METRICS_JSON, HISTORY_CSV = rundir.CONFIG, rundir.METRICS, rundir.HISTORY


# ---------------------------------------------------------------------------------------
# Files: written whole or not at all.

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
# The sections drawn from the run folder (the figures themselves: utils.figures).

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


def _calibration_section(out_dir: Path) -> Path | str:
    """The reliability figure of what the run submitted on its validation (or out-of-fold)
    images: rundir.validation_predictions."""
    if not any((out_dir / n).is_file() for n in (rundir.VAL_PREDICTIONS, rundir.OOF_PREDICTIONS)):
        return (f"Not drawn: no validation predictions yet ({rundir.VAL_PREDICTIONS} or "
                f"{rundir.OOF_PREDICTIONS}).")
    table = rundir.validation_predictions(out_dir)
    return write_reliability_figure(table[list(LABELS)].to_numpy(), table[rundir.PRED_COLUMNS].to_numpy(),
                                    out_dir / REPORT_DIR / RELIABILITY_PNG)


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
                 "shared_validation": "Blend's validation", "site": "The site's labelled scans"}


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
    return write_bytes(path, page.encode("utf-8"))


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
    windows = as_windows(windows)
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
    elif not set(SURVEY_SOURCE_COLUMNS) <= set(headers.columns):
        figures["DICOM headers"] = "Not drawn: a folder of scans (--scans) is read without a survey of its headers."
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
    if config.get("scans"):
        raise UserError(f"--report redraws a run on the Kaggle layout; {out} is a --scans run, whose report "
                        f"{out / REPORT_DIR / REPORT_HTML} was drawn at its end")
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
