"""Patient-grouped multilabel stratification: patient groups, validation splits, k folds.

Slices of one patient are near copies of each other, so a validation set that shares
patients with training overstates the score. Whole patients are therefore assigned to
folds, and the folds are stratified over all six labels at once, which no common library
does for groups. The algorithm is iterative stratification (Sechidis et al., 2011,
"On the stratification of multi-label data") lifted from images to groups:

1. Aggregate per group: positive images per label and images per group.
2. Each fold f wants a share r_f of every label's positive images and of all images.
3. Repeatedly take the label carried by the fewest unassigned groups and place each group
   carrying it, largest first, in the fold that most lacks that label; ties go to the fold
   that lacks the most images, then to a seeded random draw. Placing a group subtracts all
   of its labels and images from that fold's wants.
4. Groups with no positive label go last, largest first, to the fold lacking most images.

Departures from the paper, each measured with benchmarks/bench_split.py against the
literal algorithm (this module's figures and targets: BENCHMARKS.md, "Patient-grouped
split"):
- "Lacks" is measured as a share of the fold's own target, and a group is scored by what
  the fold would lack with half the group placed: (want - count / 2) / target. With
  equal folds the first changes nothing; for a 90/10 split, raw counts fill the training
  side with the big groups and leave validation the small, label-light ones. The half
  count keeps a group out of a fold it would overshoot by more than it helps (the greedy
  step of a chi-square-like fit), so a tiny val_frac with few groups leaves validation
  empty, an error, rather than oversized.
- Folds within half the group's count of the neediest (for equal folds; the slack scales
  with each fold's target) count as tied for the label, and such ties go to the fold
  lacking most of the group's labels and images together. Otherwise 'any', which is never
  the rarest label, is balanced only by chance.
- Largest first means by the label's count, then by all the group's positive slices.

Determinism: the only randomness is `np.random.default_rng(seed).random`, drawn up front;
groups are coded in sorted order (so row order does not matter), sorts are stable and no
result depends on dict/set iteration or hash order. Counts are integers, each fold's want
is one float product minus integers, and the few float sums run row by row in a fixed
order, so the result does not depend on the machine's summation order or SIMD width. The
same seed gives the same folds on any machine with the same numpy release (numpy keeps
the `random()` stream of its bit generators stable).

Groups: resolve_groups gives each image its patient, through fill_missing_keys, the one
rule for an ID that headers lack (utils.slices uses it for series keys too).
"""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from utils.labels import LABELS

# Fallback keys are prefixed so that a StudyInstanceUID or image ID can never merge, by an
# accidental equal string, with a real key (a PatientID here, a SeriesInstanceUID in
# utils.slices, which uses the same rule).
STUDY_PREFIX = "study:"
IMAGE_PREFIX = "image:"


# --------------------------------------------------------------------------- groups


def is_missing(values) -> np.ndarray:
    """Where 1-D `values` hold no ID: None, NaN, pandas NA or a blank string, the ways
    headers store an absent tag."""
    # A Series stays as it is: its string ops run in Arrow, where a Python object per row
    # costs seconds over the full dataset.
    column = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values, dtype=object))
    text = column.astype("str").fillna("").str.strip()
    return (column.isna() | (text == "")).to_numpy(dtype=bool)


def _borrow(key: np.ndarray, parent: np.ndarray, lost: np.ndarray, prefix: str) -> np.ndarray:
    """Rows `lost` (no key, known parent) join the one key their parent's other rows carry,
    or get ``prefix + parent`` when it carries none or several. Returns the new keys."""
    known = ~pd.isna(key) & ~pd.isna(parent)
    pairs = pd.DataFrame({"parent": parent[known], "key": key[known]}).drop_duplicates()
    n_keys = pairs.groupby("parent")["key"].transform("size").to_numpy()
    # A parent with two keys has inconsistent headers; guessing one would be arbitrary.
    single = pairs[n_keys == 1].set_index("parent")["key"]
    borrowed = pd.Series(parent[lost], dtype=object).map(single).to_numpy(dtype=object)
    own = pd.isna(borrowed)
    borrowed[own] = [prefix + str(p) for p in parent[lost][own]]
    return borrowed


def fill_missing_keys(key: np.ndarray, parents: Sequence[tuple[np.ndarray, str]],
                      image_ids: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The fallback rule for an ID key that some rows lack (a patient group, a series).

    `key` and each parent's IDs are object arrays of str, None where absent; `parents` are
    (ids, prefix) pairs, tried in turn (a StudyInstanceUID, then a PatientID). A row
    without a key whose parent has exactly one key on the rows carrying both joins that
    key: a tag missing from one file must not cut a patient in two or a slice off from its
    series. Otherwise the key is ``prefix + parent``; with no parent at all, the row is
    alone, ``IMAGE_PREFIX + image ID``. Each parent sees the keys the ones before it filled.

    Returns the filled keys (a new object array) and how many rows each parent, then the
    image, gave a key.
    """
    key = np.array(key, dtype=object)
    counts = []
    for parent, prefix in parents:
        lost = pd.isna(key) & ~pd.isna(parent)
        counts.append(int(lost.sum()))
        if lost.any():
            key[lost] = _borrow(key, parent, lost, prefix)
    alone = pd.isna(key)
    counts.append(int(alone.sum()))
    key[alone] = [IMAGE_PREFIX + str(i) for i in image_ids[alone]]
    return key, counts


def resolve_groups(
    patient_ids: Sequence, study_ids: Sequence, image_ids: Sequence
) -> tuple[np.ndarray, int, int]:
    """The patient group of each image: PatientID, else via StudyInstanceUID, else the image.

    Returns (groups, n_study_fallback, n_image_fallback): a str array, one group per row,
    and how many rows fell back to their study and to themselves.

    A row without PatientID whose study has exactly one known PatientID on other rows joins
    that patient (counted as a study fallback): a separate study group would put part of a
    patient on each side of the split, the very leak grouping exists to stop. Otherwise the
    group is ``"study:<StudyInstanceUID>"``; without a study either, ``"image:<image id>"``
    (fill_missing_keys).
    """
    patient = np.asarray(patient_ids, dtype=object)
    study = np.asarray(study_ids, dtype=object)
    image = np.asarray(image_ids, dtype=object)
    for name, values in (("patient_ids", patient), ("study_ids", study), ("image_ids", image)):
        if values.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
    if not len(patient) == len(study) == len(image):
        raise ValueError(
            f"patient_ids, study_ids and image_ids differ in length: "
            f"{len(patient)}, {len(study)}, {len(image)}"
        )
    if len(patient) == 0:
        raise ValueError("no images to group (empty input)")

    no_patient, no_study, no_image = is_missing(patient), is_missing(study), is_missing(image)
    if no_image.any():
        first = int(np.flatnonzero(no_image)[0])
        raise ValueError(
            f"{int(no_image.sum())} image IDs are missing (first at row {first}); "
            "every row needs an image ID as the last fallback group"
        )
    groups, (n_study, n_image) = fill_missing_keys(
        np.where(no_patient, None, patient.astype(str)),
        [(np.where(no_study, None, study.astype(str)), STUDY_PREFIX)],
        image.astype(str),
    )
    return groups.astype(str), n_study, n_image


# --------------------------------------------------------------------------- validation


def _check_labels(labels) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 2:
        raise ValueError(f"labels must be 2-D (images x labels), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"labels are empty (shape {array.shape})")
    if array.dtype == bool:
        return array.astype(np.int64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"labels must be bool, int or float 0/1, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
        raise ValueError(f"labels contain {int(np.isnan(array).sum())} NaN values")
    bad = (array != 0) & (array != 1)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"labels must be 0/1; found {int(bad.sum())} other values, "
            f"e.g. {array[row, col]!r} at row {row}, column {col}"
        )
    return array.astype(np.int64)


def _group_codes(groups, n_rows: int) -> tuple[np.ndarray, int]:
    """Codes 0..G-1 in sorted group order, so the split does not depend on row order."""
    array = np.asarray(groups)
    if array.ndim != 1:
        raise ValueError(f"groups must be 1-D, got shape {array.shape}")
    if len(array) != n_rows:
        raise ValueError(f"groups has {len(array)} rows but labels has {n_rows}")
    if array.dtype.kind in "OUS" and (array == "").any():
        raise ValueError("groups contain empty strings; resolve them with resolve_groups")
    codes, uniques = sorted_codes(array, "groups", "; resolve them with resolve_groups")
    return codes, len(uniques)


def sorted_codes(values, name: str, hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Codes 0..K-1 of 1-D `values` in sorted key order, and the K sorted keys: codes that
    do not depend on row order. Mixed, unsortable types and missing values are errors
    (`name` and `hint` go into the message)."""
    try:
        codes, uniques = pd.factorize(values, sort=True)
    except TypeError as error:
        raise ValueError(f"{name} must be of one sortable type (str or int): {error}") from None
    if (codes < 0).any():
        raise ValueError(f"{name} contain {int((codes < 0).sum())} missing values (None/NaN){hint}")
    return codes, np.asarray(uniques)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


# --------------------------------------------------------------------------- algorithm


def _per_group(labels: np.ndarray, codes: np.ndarray, n_groups: int):
    sizes = np.bincount(codes, minlength=n_groups)
    counts = np.stack(
        [np.bincount(codes, weights=labels[:, j], minlength=n_groups) for j in range(labels.shape[1])],
        axis=1,
    )
    # Weights make bincount return floats; the sums are exact integers (< 2**53).
    return counts.astype(np.int64), sizes.astype(np.int64)


def _pick(candidates: np.ndarray, *criteria: np.ndarray, draw: float) -> int:
    """The first fold left after keeping, criterion by criterion, the folds scoring the
    maximum among `candidates`; any tie that remains is settled by `draw` in [0, 1)."""
    tied = np.flatnonzero(candidates)
    for score in criteria:
        if len(tied) == 1:
            return int(tied[0])
        values = score[tied]
        tied = tied[values == values.max()]
    return int(tied[int(draw * len(tied))]) if len(tied) > 1 else int(tied[0])


def _assign(counts: np.ndarray, sizes: np.ndarray, shares: np.ndarray, seed: int) -> np.ndarray:
    """Fold of each group; `counts` (G x L) positive images, `sizes` (G,) images."""
    rng = np.random.default_rng(seed)
    n_groups = len(sizes)
    # Both drawn up front, one per group, so each group's randomness is fixed by the seed
    # alone, whatever order the loop meets it in.
    order_key = rng.random(n_groups)
    tie_draw = rng.random(n_groups)

    totals = counts.sum(axis=0)
    # Labels x folds, so that a label's needs are one contiguous row and the sum over a
    # group's labels below runs row by row, in one fixed order on every machine.
    label_need = totals[:, None].astype(np.float64) * shares[None, :]
    target_of = label_need.copy()
    size_need = shares * float(sizes.sum())
    size_target = size_need.copy()
    fold = np.full(n_groups, -1, dtype=np.int64)
    carries = counts > 0
    left = carries.sum(axis=0)

    while (left > 0).any():
        # Rarity is counted in groups, not images: groups are what gets placed, and a label
        # spread over few patients leaves the fewest ways to balance it, however many slices
        # those patients have. Ties go to the lower column, so the order is fixed.
        label = int(np.argmin(np.where(left > 0, left, np.iinfo(np.int64).max)))
        todo = np.flatnonzero(carries[:, label] & (fold < 0))
        # Largest first, so the small groups that come last even out what is left over
        # (as in longest-processing-time scheduling): by this label's count, then by all
        # positive slices, then the seeded key. Among equal counts of a rare label, a
        # group heavy in other labels that came late could find its fold already forced.
        todo = todo[np.lexsort((order_key[todo], -counts[todo].sum(axis=1), -counts[todo, label]))]
        for group in todo:
            carried, count = carries[group], counts[group]
            need, target_l = label_need[label], target_of[label]
            # Near-ties for this label: a quarter count of slack on each side, so for equal
            # folds "within half the group's count of the neediest". Counts shrink as the
            # loop goes, and 1-slice groups fall back to exact ties.
            slack = count[label] / 4
            near = (need + slack) / target_l > ((need - slack) / target_l).max()
            halfway = (label_need[carried] - count[carried, None] / 2) / target_of[carried]
            together = halfway.sum(axis=0)
            size_score = (size_need - sizes[group] / 2) / size_target
            target = _pick(near, together + size_score, size_score, draw=tie_draw[group])
            fold[group] = target
            label_need[:, target] -= count
            size_need[target] -= sizes[group]
        left -= carries[todo].sum(axis=0)

    todo = np.flatnonzero(fold < 0)
    todo = todo[np.lexsort((order_key[todo], -sizes[todo]))]
    for group in todo:
        size_score = (size_need - sizes[group] / 2) / size_target
        target = _pick(np.ones(len(shares), dtype=bool), size_score, draw=tie_draw[group])
        fold[group] = target
        size_need[target] -= sizes[group]
    return fold


# --------------------------------------------------------------------------- public API


def fold_count(n_groups: int, n_folds: int, what: str, category: type[Warning], stacklevel: int) -> int:
    """How many patient folds an out-of-fold fit over ``n_groups`` patients can have:
    ``n_folds``, or one per patient when there are fewer (warned as ``category``, at the
    caller ``stacklevel`` frames up); fewer than two patients leave nothing to train on."""
    if n_groups < 2:
        raise ValueError(f"{what} needs at least 2 patient groups, got {n_groups}")
    if n_groups < n_folds:
        warnings.warn(f"only {n_groups} patient groups for n_folds={n_folds}; using {n_groups} folds",
                      category, stacklevel=stacklevel + 1)
    return min(int(n_folds), n_groups)


def kfold_by_patient(labels, groups, n_folds: int, seed: int) -> np.ndarray:
    """Fold number (0..n_folds-1) of each row; every group lies in exactly one fold.

    labels: (n_images, n_labels) 0/1; groups: (n_images,) patient of each image
    (see resolve_groups); each fold gets about 1/n_folds of each label's positives.
    """
    matrix = _check_labels(labels)
    codes, n_groups = _group_codes(groups, len(matrix))
    seed = _check_seed(seed)
    if isinstance(n_folds, bool) or not isinstance(n_folds, numbers.Integral) or n_folds < 2:
        raise ValueError(f"n_folds must be an int >= 2, got {n_folds!r}")
    if n_folds > n_groups:
        raise ValueError(f"n_folds={n_folds} exceeds the number of groups ({n_groups})")
    counts, sizes = _per_group(matrix, codes, n_groups)
    fold_of_group = _assign(counts, sizes, np.full(n_folds, 1.0 / n_folds), seed)
    folds = fold_of_group[codes]
    # Cannot happen with equal shares (an empty fold always out-needs a used one), but an
    # empty fold would silently mean no validation, so it is checked, not assumed.
    if len(np.unique(folds)) != n_folds:
        raise ValueError(f"some of the {n_folds} folds came out empty; too few groups")
    return folds


def split_by_patient(labels, groups, val_frac: float, seed: int) -> np.ndarray:
    """Validation mask: about `val_frac` of the images, whole groups, stratified by label.

    The same algorithm as kfold_by_patient with two folds of unequal shares
    [1 - val_frac, val_frac], which is how Sechidis et al. define it.
    """
    matrix = _check_labels(labels)
    codes, n_groups = _group_codes(groups, len(matrix))
    seed = _check_seed(seed)
    if (
        isinstance(val_frac, bool)
        or not isinstance(val_frac, numbers.Real)
        or not 0.0 < float(val_frac) < 1.0
    ):
        raise ValueError(f"val_frac must be a number strictly between 0 and 1, got {val_frac!r}")
    val_frac = float(val_frac)
    if n_groups < 2:
        raise ValueError(f"only {n_groups} group: a patient split needs at least 2")
    counts, sizes = _per_group(matrix, codes, n_groups)
    fold_of_group = _assign(counts, sizes, np.array([1.0 - val_frac, val_frac]), seed)
    val = fold_of_group[codes] == 1
    if not val.any() or val.all():
        side = "validation" if not val.any() else "training"
        raise ValueError(
            f"the {side} side came out empty: {n_groups} groups ({len(matrix)} images) are too "
            f"few for val_frac={val_frac}; use more groups or a val_frac nearer 0.5"
        )
    return val


def count_shared_groups(groups, folds) -> int:
    """How many groups have images in more than one fold (0 for a patient-safe split)."""
    folds = np.asarray(folds)
    if folds.ndim != 1 or len(folds) != len(groups):
        raise ValueError(f"folds (shape {folds.shape}) must be 1-D, one per group entry ({len(groups)})")
    codes, _ = _group_codes(groups, len(folds))
    pairs = np.unique(np.stack([codes, folds.astype(np.int64)], axis=1), axis=0)
    return int((np.bincount(pairs[:, 0]) > 1).sum())


def fold_table(labels, groups, folds, label_names: Sequence[str] = LABELS) -> pd.DataFrame:
    """Per fold: patients, images, each label's positive rate; last row 'all' (overall).

    `folds` is a fold number per row, or split_by_patient's mask (rows 'train'/'val').
    `max_rel_dev` is the largest |fold rate - overall rate| / overall rate over labels.
    """
    matrix = _check_labels(labels)
    codes, _ = _group_codes(groups, len(matrix))
    names = [str(name) for name in label_names]
    if len(names) != matrix.shape[1]:
        raise ValueError(f"{len(names)} label names for {matrix.shape[1]} label columns")
    folds = np.asarray(folds)
    if folds.shape != (len(matrix),):
        raise ValueError(f"folds must have shape ({len(matrix)},), got {folds.shape}")
    if folds.dtype == bool:
        fold_names = {0: "train", 1: "val"}
        folds = folds.astype(np.int64)
    elif np.issubdtype(folds.dtype, np.integer):
        fold_names = {}
    else:
        raise ValueError(f"folds must be integer fold numbers or a bool mask, got {folds.dtype}")

    overall = matrix.mean(axis=0)
    rows, index = [], []
    for fold in np.unique(folds):
        rows_in = folds == fold
        rows.append([len(np.unique(codes[rows_in])), int(rows_in.sum()), *matrix[rows_in].mean(axis=0)])
        index.append(fold_names.get(int(fold), int(fold)))
    rows.append([len(np.unique(codes)), len(matrix), *overall])
    index.append("all")
    table = pd.DataFrame(rows, index=pd.Index(index, dtype=object, name="fold"),
                         columns=["patients", "images", *names])
    table[["patients", "images"]] = table[["patients", "images"]].astype(np.int64)
    rates = table[names].to_numpy(dtype=np.float64)
    # A label with no positives anywhere has rate 0 in every fold: no deviation, not 0/0.
    deviation = np.divide(np.abs(rates - overall), overall, out=np.zeros_like(rates),
                          where=overall > 0)
    table["max_rel_dev"] = deviation.max(axis=1)
    return table


def format_fold_table(table: pd.DataFrame) -> str:
    """fold_table as aligned text: rates and deviations in percent, the overall row last."""
    shown = table.copy().astype(object)
    rate_columns = [c for c in table.columns if c not in ("patients", "images")]
    for column in rate_columns:
        shown[column] = [f"{100 * value:.3f}%" for value in table[column]]
    return shown.to_string()
