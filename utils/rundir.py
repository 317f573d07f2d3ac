"""The run folder: the one place that names its files, reads and writes them, says what
a path holds, and holds a folder for one process.

    OUT/config.json            the resolved settings and the environment
    OUT/metrics.json           written last: a finished run (METRIC_KEYS: one schema)
    OUT/history.csv            one row per epoch
    OUT/label_report.csv, split.csv, bad_files.csv
    OUT/val_predictions.csv    a single run: labels and pred_* of its validation images
    OUT/oof_predictions.csv    a fold run: every labelled image, out of fold
    OUT/test_predictions.csv   one row per test image: what --ensemble averages
    OUT/submission.csv         checked against the sample submission
    OUT/refiner.pt, calibration.json      --refine, --calibrate
    OUT/embeddings/<split>.npy, <split>_ids.npy   --refine: pooled CNN features (utils/embeddings.py)
    OUT/checkpoints/last.pt, best.pt
    OUT/fold_<i>/              a fold run's folds, each a run folder of its own
    OUT/ensemble.json          --ensemble: the runs and their weights
    OUT/report/                report.html and its figures

A folder in use belongs to one process: two runs writing one folder mix their files, and
a second run's start-up (``--resume`` clears unfinished temporary files) would delete the
first one's writes in flight. A run holds its folder with an operating-system lock
(``flock``) on ``OUT/.lock``, released when the process ends, however it ends (a crash or
SIGKILL included), so a stale lock never needs clearing by hand. Under torchrun rank 0
holds it for all ranks.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pandas as pd

from utils.atomic import atomic_write
from utils.errors import UserError, writing
from utils.labels import LABELS

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are not locked there
    fcntl = None

LOG = logging.getLogger(__name__)

CONFIG, METRICS, HISTORY = "config.json", "metrics.json", "history.csv"
LABEL_REPORT, SPLIT, BAD_FILES = "label_report.csv", "split.csv", "bad_files.csv"
VAL_PREDICTIONS, OOF_PREDICTIONS = "val_predictions.csv", "oof_predictions.csv"
TEST_PREDICTIONS, SUBMISSION = "test_predictions.csv", "submission.csv"
REFINER, CALIBRATION, ENSEMBLE = "refiner.pt", "calibration.json", "ensemble.json"
CHECKPOINTS, LAST, BEST = "checkpoints", "last.pt", "best.pt"
REPORT, LOCK_NAME = "report", ".lock"
EMBEDDINGS = "embeddings"  # a folder: VAL_SPLIT and TEST_SPLIT features and their image IDs
VAL_SPLIT, TEST_SPLIT = "val", "test"
SLICES, SERIES, SKIPPED = "slices.csv", "series.csv", "skipped.csv"  # --predict DIR's folder
PREDICT_OUTPUTS = (SLICES, SERIES, SKIPPED)
PREDICT_HTML, EVALUATE_HTML = "predict.html", "evaluate.html"  # in REPORT

PRED_COLUMNS = [f"pred_{k}" for k in LABELS]
REFINED_COLUMNS = [f"refined_{k}" for k in LABELS]  # oof_predictions.csv, where the refiner was used

# One metrics schema for a single run (validated on its held-out patients), a fold run (out
# of fold) and an ensemble (on the validation images its runs share): the same key, the same
# number. weighted_log_loss is the loss of what the run submitted (refined where the refiner
# was used), the others the steps towards it; a step not taken is absent.
METRIC_KEYS = {
    "validated_on": "validation, out_of_fold, shared_validation or site (--evaluate: a site's labelled scans)",
    "n_validation": "the images the losses are measured on",
    "weighted_log_loss": "the competition metric of the submitted predictions",
    "weighted_log_loss_per_slice": "before refining: the per-slice model's",
    "weighted_log_loss_refined": "after refining along each series, out of fold: the better refiner's",
    "weighted_log_loss_refined_logits": "the logit refiner's (a 1-D conv over the logits), out of fold",
    "weighted_log_loss_refined_embeddings": "the embedding refiner's (a GRU over logits and features), out of fold",
    "weighted_log_loss_calibrated": "after a temperature per class, out of fold",
    "prior_weighted_log_loss": "the constant training prior's, the floor to beat",
}


def fold_dir(out: Path, i: int) -> Path:
    return Path(out) / f"fold_{i}"


def embedding_files(out: Path, split: str) -> tuple[Path, Path]:
    """The features of a run's ``split`` (VAL_SPLIT, TEST_SPLIT) and their image IDs."""
    return Path(out) / EMBEDDINGS / f"{split}.npy", Path(out) / EMBEDDINGS / f"{split}_ids.npy"


def fold_dirs(out: Path) -> list[Path]:
    """OUT/fold_<i>/ in the order of i."""
    found = [p for p in Path(out).glob("fold_*") if p.is_dir() and re.fullmatch(r"fold_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def checkpoint(out: Path, name: str = BEST) -> Path:
    return Path(out) / CHECKPOINTS / name


def kind(path: Path) -> str:
    """What a --checkpoint path holds: "checkpoint" (a .pt file), "ensemble", "folds" (a
    --fold all run) or "run"; a UserError when it is none of them."""
    path = Path(path)
    if path.is_file():
        return "checkpoint"
    if (path / ENSEMBLE).is_file():
        return "ensemble"
    if any(checkpoint(f).is_file() for f in fold_dirs(path)):
        return "folds"
    if checkpoint(path).is_file():
        return "run"
    raise UserError(f"{path} holds no {CHECKPOINTS}/{BEST}, fold_*/ or {ENSEMBLE}")


def model_checkpoints(path: Path) -> list[Path]:
    """The best.pt files a run (one) or a fold run (one per fold) predicts with."""
    if kind(path) == "folds":
        return [checkpoint(f) for f in fold_dirs(path) if checkpoint(f).is_file()]
    return [checkpoint(path)]


def ensemble_runs(path: Path) -> tuple[list[Path], list[float] | None]:
    spec = read_json(Path(path) / ENSEMBLE)
    return [Path(r) for r in spec["runs"]], spec["weights"]


def first_checkpoint(path: Path) -> Path:
    """The first model of a checkpoint, a run, a fold run or an ensemble."""
    what = kind(path)
    if what == "checkpoint":
        return Path(path)
    if what == "ensemble":
        return first_checkpoint(ensemble_runs(path)[0][0])
    return model_checkpoints(path)[0]


def header_cache(folder: str | None, out: Path, data_dir: Path, split: str) -> Path:
    """Where the header scan of a data folder's split is cached: ``folder``, or beside the
    run folders so the next run reuses it (the run folder itself where that is read-only).

    Parquet, not a pickle: a cache must never be able to run code. Keyed by the data
    folder; rows are reused only for files whose size and modification time match.
    """
    place = Path(folder) if folder else Path(out).parent / "header_cache"
    try:
        place.mkdir(parents=True, exist_ok=True)
    except OSError:
        place = Path(out)
    key = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
    return place / f"headers_{split}_{key}.parquet"


def write_file(path: Path, write) -> None:
    """An output through utils.atomic.atomic_write; failing to write it is an OutputError.
    Only rank 0 writes: every caller under torchrun checks."""
    with writing(path):
        atomic_write(path, write)


def write_json(path: Path, obj) -> None:
    write_file(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_csv(path: Path, df: pd.DataFrame, **kwargs) -> None:
    write_file(path, lambda tmp: df.to_csv(tmp, **kwargs))


def copy_file(source: Path, path: Path) -> None:
    write_file(path, lambda tmp: shutil.copyfile(source, tmp))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_predictions(path: Path) -> pd.DataFrame:
    # pyarrow's parser reads back exactly the floats pandas wrote, on every pandas version
    return pd.read_csv(path, engine="pyarrow").set_index("image_id")


def predictions_table(truth: pd.DataFrame, probs) -> pd.DataFrame:
    """Labels and pred_* columns: val_predictions.csv, and a fold's share of oof_predictions.csv."""
    return pd.concat([truth, pd.DataFrame(probs, index=truth.index, columns=PRED_COLUMNS)], axis=1)


def final_columns(predictions: pd.DataFrame) -> list[str]:
    """The columns of a predictions table that hold what its run submitted: refined_*
    where the refiner was used, else pred_*."""
    return REFINED_COLUMNS if set(REFINED_COLUMNS) <= set(predictions.columns) else PRED_COLUMNS


def validation_predictions(run: Path) -> pd.DataFrame:
    """A finished run's validation (or out-of-fold) images: the labels and, as pred_*, the
    values it submitted (final_columns). The rule the report and --ensemble share."""
    run = Path(run)
    path = run / OOF_PREDICTIONS if (run / OOF_PREDICTIONS).is_file() else run / VAL_PREDICTIONS
    table = read_predictions(path)
    return table[list(LABELS)].join(table[final_columns(table)].set_axis(PRED_COLUMNS, axis=1))


def record_bad_files(out: Path, paths, reason: str) -> None:
    """Add files that failed only when their pixels were decoded to bad_files.csv."""
    table = pd.read_csv(out / BAD_FILES, dtype=str)
    new = [p for p in map(str, paths) if p not in set(table["path"])]
    if new:
        for p in new:
            LOG.info(f"  unreadable: {p}: {reason}")
        rows = pd.DataFrame({"path": new, "reason": reason})
        write_csv(out / BAD_FILES, pd.concat([table, rows], ignore_index=True), index=False)


def bad_paths(folders: list[Path]) -> set[str]:
    """Every path the bad_files.csv of these folders lists."""
    return {p for f in folders if (f / BAD_FILES).is_file() for p in pd.read_csv(f / BAD_FILES, dtype=str)["path"]}


def merge_bad_files(out: Path) -> None:
    """OUT/bad_files.csv: the scan's list and what each fold found when decoding pixels."""
    tables = [pd.read_csv(f / BAD_FILES, dtype=str) for f in [Path(out), *fold_dirs(out)]]
    write_csv(out / BAD_FILES, pd.concat(tables, ignore_index=True).drop_duplicates("path"), index=False)


class FolderInUse(UserError):
    """Another process holds the run folder."""


@contextlib.contextmanager
def exclusive(folder: Path):
    """Hold ``folder`` (created if missing) for this process until the block ends; if
    another process holds it, FolderInUse names that process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield folder
        return
    with open(folder / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise FolderInUse(f"{folder} is in use by another run (process {holder}); wait for it "
                              f"to end or stop it, or use another --out-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield folder


def prepare_out_dir(out: Path, held: contextlib.ExitStack, resume: bool, overwrite: bool,
                    inputs: Path | None = None) -> Path:
    """A training run's folder, held by this process until ``held`` closes (a second run on
    it is refused before it touches anything). Under --resume, writes the interrupted run
    did not finish are removed, and with no checkpoint here one is adopted from ``inputs``."""
    held.enter_context(exclusive(out))
    finished = [n for n in (SUBMISSION, METRICS) if (out / n).exists()]
    if finished and not (resume or overwrite):
        raise UserError(f"{out} already holds a finished run ({', '.join(finished)}); pass "
                        f"--resume to continue it, --overwrite to replace it, or another --out-dir")
    (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    if resume:
        for unfinished in out.rglob("*.tmp"):  # utils.atomic's name for a write not finished
            if unfinished.is_file():
                unfinished.unlink()
                LOG.info(f"Removed {unfinished}, a file the interrupted run did not finish writing")
        if inputs is not None and not checkpoint(out, LAST).is_file() and not fold_dirs(out):
            adopt_previous_session(out, inputs)
    return out


def adopt_previous_session(out: Path, inputs: Path) -> Path | None:
    """Kaggle sessions end after a few hours and start with an empty /kaggle/working: a
    later session resumes from the previous one's output attached as an input dataset.
    A --fold all run brings every fold folder, finished or not."""
    if not inputs.is_dir():
        return None
    found = sorted(inputs.rglob(f"{CHECKPOINTS}/{LAST}"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    previous = found[-1].parent.parent
    names = [f"{CHECKPOINTS}/{LAST}", f"{CHECKPOINTS}/{BEST}", HISTORY]
    if re.fullmatch(r"fold_\d+", previous.name):
        previous = previous.parent
        names = [str(p.relative_to(previous)) for f in fold_dirs(previous) for p in sorted(f.rglob("*"))
                 if p.is_file() and REPORT not in p.relative_to(previous).parts]
    for name in names:
        if (previous / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            copy_file(previous / name, out / name)
    LOG.info(f"Resuming from the previous session's checkpoint in {previous}")
    return previous


def prepare_predict_dir(out: Path, held: contextlib.ExitStack, overwrite: bool) -> Path:
    """The folder of --predict's outputs, held by this process until ``held`` closes."""
    held.enter_context(exclusive(out))
    done = [n for n in PREDICT_OUTPUTS if (out / n).exists()]
    if done and not overwrite:
        raise UserError(f"{out} already holds predictions ({', '.join(done)}); pass --overwrite or another --out-dir")
    (out / REPORT).mkdir(parents=True, exist_ok=True)
    return out
