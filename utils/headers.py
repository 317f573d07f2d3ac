"""The header scan of many files: parallel, cached, every unreadable file named.

    headers, bad = scan_headers(paths, workers=8, cache="headers.parquet")

One row per readable file (utils.dicom.Header's fields and its path), one per unreadable
file with utils.dicom's reason. The per-file reader is utils.dicom.read_header.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path

import pandas as pd

from utils.atomic import atomic_write
from utils.dicom import DicomError, Header, read_header

HEADER_COLUMNS = [f.name for f in fields(Header)]
_COLUMN_TYPES = {"str": "str", "int": "int64", "float": "float64", "bool": "bool"}


def map_chunks(fn, items: list, workers: int = 0, parallel_min: int = 2000) -> list:
    """``fn`` (a module-level function of a list, returning a list) over ``items`` in
    chunks, in ``workers`` processes when there are at least ``parallel_min`` items (below
    that, starting processes costs more than it saves); the results joined, in order."""
    if not items:
        return []
    if workers <= 1 or len(items) < parallel_min:
        return fn(items)
    chunk = max(64, len(items) // (workers * 16))
    results = []
    with ProcessPoolExecutor(workers) as pool:
        for part in pool.map(fn, [items[i:i + chunk] for i in range(0, len(items), chunk)]):
            results.extend(part)
    return results


def _scan_chunk(paths: list[str]) -> list[tuple[str, dict | None, str]]:
    out = []
    for p in paths:
        try:
            out.append((p, asdict(read_header(p)), ""))
        except DicomError as err:
            out.append((p, None, err.reason))
    return out


def scan_headers(paths, workers: int = 0, cache: str | Path | None = None,
                 parallel_min: int = 2000, update_cache: bool = True):
    """Headers of many files -> (headers DataFrame, bad files DataFrame[path, reason]).

    Files are read in ``workers`` processes when there are at least ``parallel_min`` of
    them (below that, starting processes costs more than it saves). With ``cache`` (a parquet
    file) rows of files whose size and modification time are unchanged are reused, and the
    cache is rewritten unless ``update_cache`` is False (torchrun's other ranks).
    """
    paths = [str(p) for p in paths]
    stats = {}
    for p in paths:
        try:
            st = os.stat(p)
            stats[p] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stats[p] = (-1, -1)
    cached = {}
    if cache is not None and Path(cache).is_file():
        old = pd.read_parquet(cache)
        if list(old.columns) != ["path", "file_size", "mtime_ns", "error", *HEADER_COLUMNS]:
            old = old.iloc[:0]  # written by another version of this reader: read every file again
        for row in old.to_dict("records"):
            if stats.get(row["path"]) == (row["file_size"], row["mtime_ns"]):
                cached[row["path"]] = row
    todo = [p for p in paths if p not in cached]
    results = map_chunks(_scan_chunk, todo, workers, parallel_min)
    rows = []
    for p, header, reason in results:
        row = {"path": p, "file_size": stats[p][0], "mtime_ns": stats[p][1], "error": reason}
        row.update(header or {c: None for c in HEADER_COLUMNS})
        if header is None:
            row["image_id"] = Path(p).stem
        rows.append(row)
    rows.extend(cached[p] for p in paths if p in cached)
    table = pd.DataFrame(rows, columns=["path", "file_size", "mtime_ns", "error", *HEADER_COLUMNS])
    order = {p: i for i, p in enumerate(paths)}
    table = table.sort_values("path", key=lambda s: s.map(order)).reset_index(drop=True)
    if cache is not None and update_cache:  # two runs may write it at once: atomic_write
        atomic_write(cache, lambda tmp: table.to_parquet(tmp, index=False))
    bad = table.loc[table["error"] != "", ["path", "error"]].rename(columns={"error": "reason"})
    good = table.loc[table["error"] == "", ["path", *HEADER_COLUMNS]].reset_index(drop=True)
    # Unreadable rows held None in every column; the readable ones get their real types back.
    good = good.astype({f.name: _COLUMN_TYPES[f.type] for f in fields(Header)})
    return good, bad.reset_index(drop=True)
