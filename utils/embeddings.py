"""Each image's pooled CNN features, kept in a run folder for the embedding refiner.

    save(out, "val", ids, features)             # OUT/embeddings/val.npy and val_ids.npy
    source = load([out], "val", ids)            # a RowSource: features of ids, row by row

Stored as float16 (n, D) NumPy files and read back as memory maps. At the competition's
size (752,803 out-of-fold rows x 2,048 features x 2 bytes) that is 3.08 GB on disk and
0.50 GB for the 121,232 test images per model; none of it is in memory until a batch of
rows is read (utils.refiner gathers them series batch by series batch).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from utils import rundir

LOG = logging.getLogger(__name__)
DTYPE = np.float16


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.save given a name would add ".npy" to the temporary one
        np.save(handle, array, allow_pickle=False)


def save(out: Path, split: str, ids, features: np.ndarray) -> None:
    """The features (n, D) of images ``ids``, in that order, written atomically as float16."""
    ids = np.asarray(ids, dtype=str)
    if features.ndim != 2 or len(features) != len(ids):
        raise ValueError(f"features must be (n, D) with a row per ID ({len(ids)}), got {features.shape}")
    array_path, ids_path = rundir.embedding_files(out, split)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_file(array_path, lambda tmp: _save_array(tmp, np.asarray(features, dtype=DTYPE)))
    rundir.write_file(ids_path, lambda tmp: _save_array(tmp, ids))


class RowSource:
    """Rows of several (n_k, D) arrays as one (n, D) table: row i is arrays[part[i]][local[i]].
    Indexing with integer rows reads only those rows, each array's in ascending order (a
    memory map then reads each page once)."""

    def __init__(self, arrays: list[np.ndarray], part: np.ndarray, local: np.ndarray):
        widths, dtypes = {a.shape[1] for a in arrays}, {a.dtype for a in arrays}
        if len(widths) != 1 or len(dtypes) != 1:
            raise ValueError(f"the arrays have different widths or types: {sorted(widths)}, {sorted(map(str, dtypes))}")
        self.arrays, self.part, self.local = arrays, np.asarray(part), np.asarray(local)
        self.shape = (len(self.part), widths.pop())

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        """Those rows, in the dtype stored (float16 from a run folder)."""
        rows = np.asarray(rows)
        out = np.empty((len(rows), self.shape[1]), dtype=self.arrays[0].dtype)
        parts = self.part[rows]
        for p in np.unique(parts):
            mine = np.flatnonzero(parts == p)
            local = self.local[rows[mine]]
            order = np.argsort(local, kind="stable")
            out[mine[order]] = self.arrays[p][local[order]]
        return out


def load(folders: list[Path], split: str, ids) -> RowSource | None:
    """The features of ``ids`` from the first of ``folders`` that holds each (the folds of a
    fold run hold their own validation images); None, with the reason logged, when a folder
    has no features or an ID is in none of them."""
    ids = pd.Index(ids)
    arrays, part, local = [], np.full(len(ids), -1), np.full(len(ids), -1)
    for k, folder in enumerate(folders):
        array_path, ids_path = rundir.embedding_files(folder, split)
        if not (array_path.is_file() and ids_path.is_file()):
            LOG.info(f"No {split} features in {folder} (a run without --refine wrote none)")
            return None
        arrays.append(np.load(array_path, mmap_mode="r"))
        where = pd.Index(np.load(ids_path)).get_indexer(ids)
        new = (where >= 0) & (part < 0)
        part[new], local[new] = k, where[new]
    if (part < 0).any():
        LOG.info(f"{int((part < 0).sum())} images have no {split} features (e.g. {ids[part < 0][0]})")
        return None
    return RowSource(arrays, part, local)
