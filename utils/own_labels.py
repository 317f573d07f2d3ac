"""Your own labelled scans: fine-tuning a run's model on them (kernel.py --scans DIR --labels
CSV --weights RUN/checkpoints/best.pt) and scoring a model on them (--evaluate DIR).

The folder and its label CSV become the slice table of utils/dataset.py, which the split,
the training loop, the refiner and calibration take as they take the Kaggle layout.
"""
from __future__ import annotations

import logging
from pathlib import Path

from utils import rundir
from utils.dataset import labelled_folder
from utils.ensemble import file_sha1

LOG = logging.getLogger(__name__)


def load_scans(scans: str, labels: str, workers: int, out_dir: Path, main: bool) -> dict:
    """kernel.load_data's answer for --scans DIR --labels CSV: the folder's labelled slices
    as the training set, scanned as --predict scans; no test set, so no submission. What
    was skipped goes to bad_files.csv (rank 0, ``main``)."""
    data = labelled_folder(scans, labels, workers=workers)
    LOG.info(f"Scans {scans}: {data.scan.summary()}")
    LOG.info(f"Labels {labels}: {data.describe()}")
    if main:
        rundir.write_csv(out_dir / rundir.BAD_FILES, data.scan.skipped, index=False)
    return {"labels": data.labels, "test_ids": [], "train_headers": data.headers,
            "test_headers": data.headers.iloc[:0], "data_dir": Path(scans),
            "fingerprint": {Path(labels).name: file_sha1(labels)}}
