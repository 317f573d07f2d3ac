"""Every stage of the pipeline that does not touch pixels, at the real competition size.

    .venv/bin/python benchmarks/bench_scale.py                             # full size, 2-3 minutes
    .venv/bin/python benchmarks/bench_scale.py --train 60000 --test 12000  # quick look
    .venv/bin/python benchmarks/bench_scale.py --profile refiner           # where a stage's time goes

Data: synthetic, shaped like stage 2 (752,803 training and 121,232 test images): patients
of 20-60 slices, one study and one series each, slices 5 mm apart along z, rows shuffled;
lesions are runs of neighbouring slices with benchmarks/bench_split.py's model and rates
(any ~14 %, subdural ~6 %, epidural ~0.4 %). Random logits stand in for the network: the
class prior's logit, plus or minus SIGNAL by the label, plus Gaussian noise (half of its
variance shared by the patient's slices), drawn afresh for each fold's model.

Stages, each on what the ones before produced, as `kernel.py --folds 5 --fold all --refine`
runs them:
  labels        read_labels of a 4.5M-row stage_2_train.csv (written beforehand, untimed)
  split         resolve_groups + kfold_by_patient (5 folds) + fold_table
  slice order   order_slices + neighbour_paths on the training and the test headers
  OOF assembly  assemble_oof of the 5 folds' validation tables
  refiner       fit_refiner on all 752k out-of-fold rows, n_folds=5 (as fit_series_refiner)
  fold average  average of the 5 folds' 121,232-row test tables
  refine test   refine: the 5 refiners along every test series (as refine_test)
  submission    build_submission + write_submission + check_submission_file, 727,392 rows
  CSV outputs   oof_predictions.csv and test_predictions.csv, pandas to_csv as kernel.py
                writes them; shown, but not counted in the target (issue 15 lists the rest)
With --embeddings D (2048: ResNeXt-101's pooled features) two more stages follow, as the run
does them when it kept features: each fold's validation and test features are written first
(untimed; float16, utils.embeddings.save into fold_<i>/embeddings/, the labels' signal
through a random projection plus noise), then
  embedding refiner   fit_refiner on all out-of-fold rows with features read back through
                      utils.embeddings.load (memory maps; a batch of series at a time)
  embedding test      utils.inference.refine_test: each fold model's test probabilities and
                      features refined, then averaged
Their targets: under 15 minutes and 8 GB together. --embeddings-only skips the other stages'
targets (they still run: the embedding stages need their outputs).
Printed per stage: wall seconds (what the targets count), CPU seconds of this process (less
moved by other work on a shared machine; above the wall time where a stage uses two
threads) and the process's peak resident memory during the stage (VmHWM, reset before each
stage through /proc/self/clear_refs; it includes what earlier stages still hold, as in
kernel.py). Targets: all stages under 120 s, peak under 4 GB; exits 1 if one is missed.
--profile STAGE prints that stage's cProfile (slowest first, cumulative).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere
from benchmarks.bench_split import (  # noqa: E402
    JITTER,
    LESION_SPAN,
    P_ANY_PATIENT,
    P_SUBTYPE_GIVEN_ANY,
    SLICES,
)
from utils import embeddings  # noqa: E402
from utils.ensemble import assemble_oof, average  # noqa: E402
from utils.inference import TestPredictions  # noqa: E402
from utils.inference import refine_test as refine_members  # noqa: E402
from utils.labels import LABELS, read_labels  # noqa: E402
from utils.metrics import logit  # noqa: E402
from utils.refiner import fit_refiner, refine  # noqa: E402
from utils.rundir import PRED_COLUMNS  # noqa: E402
from utils.slices import neighbour_paths, order_slices  # noqa: E402
from utils.split import fold_table, kfold_by_patient, resolve_groups  # noqa: E402
from utils.submission import build_submission, check_submission_file, write_submission  # noqa: E402

N_TRAIN = 752_803  # stage_2_train.csv once its duplicate rows are dropped
N_TEST = 121_232  # stage_2_sample_submission.csv: 727,392 rows
N_FOLDS = 5
Z_STEP_MM = 5.0
# The stand-in network: logit = prior logit +/- SIGNAL + noise. Half the noise's variance
# is shared by a patient's slices (a real model errs alike on one scan), half is the
# slice's own, which is what the refiner can average away along z.
SIGNAL = 2.0
NOISE = 1.5
STAGES = ("labels", "split", "slice order", "OOF assembly", "refiner", "fold average", "refine test", "submission",
          "CSV outputs")
# Timed and shown, but outside the target: issue 15's goal names the stages above it.
OUTSIDE_TARGET = ("CSV outputs",)
TARGET_SECONDS = 120
TARGET_PEAK_MB = 4096
EMBEDDING_STAGES = ("embedding refiner", "embedding test")  # --embeddings D: targets of their own (issue 24)
EMBEDDING_TARGET_SECONDS = 15 * 60
EMBEDDING_TARGET_PEAK_MB = 8192


# ------------------------------------------------------------------------------ data


def hex_ids(rng: np.random.Generator, n: int, digits: int) -> np.ndarray:
    """n distinct `ID_<digits hex>` strings, the shape of the dataset's IDs."""
    return np.array([f"ID_{value:0{digits}x}" for value in rng.choice(16**digits, n, replace=False).tolist()])


def scan_sizes(rng: np.random.Generator, n_images: int) -> np.ndarray:
    """Slices per patient, SLICES[0]-SLICES[1] each, summing to n_images (the last scan cut short)."""
    sizes = rng.integers(SLICES[0], SLICES[1] + 1, size=n_images // SLICES[0] + 1)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n_images) + 1]
    sizes[-1] -= sizes.sum() - n_images
    return sizes


def synthetic_images(n_train: int, n_test: int, seed: int) -> pd.DataFrame:
    """One row per image: the header columns the stages need, `split`, the six labels and
    the slice's place in its scan (`position`, for checking only); rows in shuffled order."""
    rng = np.random.default_rng(seed)
    sizes = np.concatenate([scan_sizes(rng, n_train), scan_sizes(rng, n_test)])
    n, n_patients = n_train + n_test, len(sizes)
    patient = np.repeat(np.arange(n_patients), sizes)
    position = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    # bench_split's lesion model, for all five subtypes at once: a sick patient has each
    # subtype by its own chance, as one run of slices near a focus shared by the subtypes.
    per_scan = sizes[:, None]
    has = (rng.random(n_patients) < P_ANY_PATIENT)[:, None] & (rng.random((n_patients, 5)) < P_SUBTYPE_GIVEN_ANY)
    span = np.maximum(1, np.round(rng.uniform(*LESION_SPAN, (n_patients, 5)) * per_scan)).astype(np.int64)
    centre = (rng.uniform(0.25, 0.75, (n_patients, 1)) + rng.normal(0.0, JITTER, (n_patients, 5))) * per_scan
    first = np.clip(np.round(centre - span / 2).astype(np.int64), 0, per_scan - span)
    offset = position[:, None] - first[patient]
    subtypes = has[patient] & (offset >= 0) & (offset < span[patient])
    labels = np.column_stack([subtypes, subtypes.any(axis=1)]).astype(np.int8)

    image_ids = hex_ids(rng, n, 9)
    split = np.where(np.arange(n) < n_train, "train", "test")
    table = pd.DataFrame({
        "image_id": image_ids, "split": split,
        "patient_id": hex_ids(rng, n_patients, 8)[patient],
        "study_uid": hex_ids(rng, n_patients, 10)[patient],
        "series_uid": hex_ids(rng, n_patients, 10)[patient],
        "z": rng.uniform(-200.0, 0.0, n_patients)[patient] + Z_STEP_MM * position,
        "path": np.char.add(np.char.add(np.where(split == "train", "stage_2_train/", "stage_2_test/"), image_ids), ".dcm"),
        "position": position,
        **{name: labels[:, j] for j, name in enumerate(LABELS)},
    })
    return table.iloc[rng.permutation(n)].reset_index(drop=True)


def write_id_label_csv(path: Path, image_ids: np.ndarray, values: np.ndarray) -> None:
    """Kaggle's long layout: `ID,Label`, one row per image and subtype (LABELS order)."""
    row_ids = pc.binary_join_element_wise(pa.array(np.repeat(image_ids, len(LABELS))),
                                          pa.array(np.tile(np.array(LABELS), len(image_ids))), "_")
    with open(path, "wb") as fh:
        fh.write(b"ID,Label\n")
        pacsv.write_csv(pa.table({"ID": row_ids, "Label": pa.array(values.ravel())}), fh,
                        pacsv.WriteOptions(include_header=False, quoting_style="none"))


def fold_predictions(labels: pd.DataFrame, folds: np.ndarray, train: pd.DataFrame, test: pd.DataFrame,
                     seed: int) -> tuple[dict[int, pd.DataFrame], list[pd.DataFrame]]:
    """What run_fold returns for each fold: its validation table (labels and pred_* columns)
    and its test probabilities, from the stand-in network."""
    rng = np.random.default_rng([seed, 1])
    by_fold, test_tables = {}, []
    for fold in range(N_FOLDS):
        val = labels[folds == fold]
        probs = network_probs(val.to_numpy(), train.loc[val.index, "patient_id"].to_numpy(), rng)
        by_fold[fold] = val.assign(**dict(zip(PRED_COLUMNS, probs.T)))
        probs = network_probs(test[list(LABELS)].to_numpy(), test["patient_id"].to_numpy(), rng)
        test_tables.append(pd.DataFrame(probs, index=test.index, columns=list(LABELS)))
    return by_fold, test_tables


def network_probs(labels: np.ndarray, patients: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a fold's model might say: (n, 6) probabilities that carry the labels' signal."""
    codes, uniques = pd.factorize(patients)
    noise = rng.standard_normal((len(uniques), len(LABELS)))[codes] + rng.standard_normal(labels.shape)
    logits = logit(labels.mean(axis=0)) + SIGNAL * (2.0 * labels - 1.0) + NOISE * np.sqrt(0.5) * noise
    return 1.0 / (1.0 + np.exp(-logits))


# ----------------------------------------------------------------------------- stages


def split_folds(labels: pd.DataFrame, headers: pd.DataFrame, seed: int) -> np.ndarray:
    """make_split's work: patient groups, 5 stratified folds, their table."""
    h = headers.loc[labels.index]
    groups, _, _ = resolve_groups(h["patient_id"].to_numpy(), h["study_uid"].to_numpy(), labels.index.to_numpy())
    y = labels.to_numpy()
    folds = kfold_by_patient(y, groups, N_FOLDS, seed)
    fold_table(y, groups, folds, LABELS)
    return folds


def with_slice_order(*tables: pd.DataFrame) -> list[pd.DataFrame]:
    """add_slice_order's work on each header table: series, position, the neighbours' paths."""
    out = []
    for headers in tables:
        order = order_slices(headers.reset_index())
        near = neighbour_paths(order, headers["path"], radius=1)
        out.append(headers.assign(series=order["series"].to_numpy(), position=order["position"].to_numpy(),
                                  below=near[-1].to_numpy(), above=near[1].to_numpy()))
    return out


def fit_oof_refiner(oof: pd.DataFrame, headers: pd.DataFrame, seed: int):
    """fit_series_refiner's call: logits of the OOF probabilities, patient groups, 5 folds."""
    h = headers.loc[oof.index]
    groups, _, _ = resolve_groups(h["patient_id"].to_numpy(), h["study_uid"].to_numpy(), oof.index.to_numpy())
    return fit_refiner(logit(oof[PRED_COLUMNS].to_numpy()), oof[list(LABELS)].to_numpy(), h["series"].to_numpy(),
                       h["position"].to_numpy(), groups, n_folds=N_FOLDS, seed=seed)


def refine_test(result, probs: pd.DataFrame, headers: pd.DataFrame) -> pd.DataFrame:
    h = headers.loc[probs.index]
    refined = refine(result, logit(probs.to_numpy()), h["series"].to_numpy(), h["position"].to_numpy())
    return pd.DataFrame(refined, index=probs.index, columns=probs.columns)


def submit(probs: pd.DataFrame, sample: Path, out: Path) -> list[str]:
    submission = build_submission(sample, probs.index.tolist(), probs.to_numpy())
    write_submission(submission, out, sample)
    return check_submission_file(out, sample)


def write_outputs(oof: pd.DataFrame, result, test_probs: pd.DataFrame, folder: Path) -> None:
    """The two tables run_folds writes besides the submission, the way its write_csv does."""
    refined = dict(zip([f"refined_{k}" for k in LABELS], result.oof_probs.T))
    oof.assign(**refined).to_csv(folder / "oof_predictions.csv")
    test_probs.to_csv(folder / "test_predictions.csv")


def write_features(by_fold: dict[int, pd.DataFrame], test: pd.DataFrame, width: int, folder: Path,
                   seed: int) -> list[Path]:
    """Each fold's validation and test features, as run_fold keeps them: the labels through a
    random projection plus noise (a stand-in for what a CNN's embedding carries)."""
    rng = np.random.default_rng([seed, 2])
    mixing = rng.standard_normal((len(LABELS), width)).astype(np.float32)
    folders = []
    for fold, val in by_fold.items():
        out = folder / f"fold_{fold}"
        for split, table in (("val", val), ("test", test)):
            values = table[list(LABELS)].to_numpy(np.float32) @ mixing
            values += rng.standard_normal(values.shape, dtype=np.float32) * 2
            embeddings.save(out, split, table.index, values)
            del values
        folders.append(out)
    return folders


def fit_embedding_refiner(oof: pd.DataFrame, headers: pd.DataFrame, folders: list[Path], seed: int):
    """fit_series_refiner's second call: the same rows and folds, with the features."""
    h = headers.loc[oof.index]
    groups, _, _ = resolve_groups(h["patient_id"].to_numpy(), h["study_uid"].to_numpy(), oof.index.to_numpy())
    return fit_refiner(logit(oof[PRED_COLUMNS].to_numpy()), oof[list(LABELS)].to_numpy(), h["series"].to_numpy(),
                       h["position"].to_numpy(), groups, n_folds=N_FOLDS, seed=seed,
                       features=embeddings.load(folders, "val", oof.index))


def refine_test_members(result, tables: list[pd.DataFrame], headers: pd.DataFrame,
                        folders: list[Path]) -> pd.DataFrame:
    """refine_test of kernel.py with the embedding refiner: each fold's own features."""
    scanned = tables[0].index.tolist()
    members = [TestPredictions(t, scanned, [], embeddings.load([f], "test", scanned)) for t, f in zip(tables, folders)]
    return refine_members(result, TestPredictions(average(tables), scanned, [], members=members), headers).probs


# ------------------------------------------------------------------------ measurement


def reset_peak() -> bool:
    """Start VmHWM afresh at the current resident size (Linux); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) / 1024


def peak_mb() -> float:
    try:
        return _status_mb("VmHWM")
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> float:
    try:
        return _status_mb("VmRSS")
    except (OSError, IndexError):
        return float("nan")


class Stages:
    """Runs stages one after another and keeps (name, wall s, CPU s, peak MB) of each."""

    def __init__(self, profile: list[str]):
        self.rows: list[tuple[str, float, float, float]] = []
        self.profile = set(profile)
        self.per_stage_peak = True

    def run(self, name: str, function, *args):
        self.per_stage_peak &= reset_peak()
        profiler = cProfile.Profile() if name in self.profile else None
        start, cpu = time.perf_counter(), time.process_time()
        result = profiler.runcall(function, *args) if profiler else function(*args)
        self.rows.append((name, time.perf_counter() - start, time.process_time() - cpu, peak_mb()))
        print(f"  {name}: {self.rows[-1][1]:.1f} s", flush=True)
        if profiler:
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
        return result

    def report(self, judge_main: bool = True) -> bool:
        """Print the table and the targets; whether they are met (the embedding stages' where
        they ran; the others' unless ``judge_main`` is false)."""
        counted = [row for row in self.rows if row[0] not in OUTSIDE_TARGET + EMBEDDING_STAGES]
        total_s, total_cpu = (sum(row[i] for row in counted) for i in (1, 2))
        peak = max(row[3] for row in counted)
        what = "during the stage" if self.per_stage_peak else "of the process so far (VmHWM could not be reset)"
        print(f"\n| stage | seconds | CPU s | peak MB ({what}) |\n| --- | ---: | ---: | ---: |")
        for name, seconds, cpu, mb in counted:
            print(f"| {name} | {seconds:.1f} | {cpu:.1f} | {mb:,.0f} |")
        print(f"| **all stages** | **{total_s:.1f}** | **{total_cpu:.1f}** | **{peak:,.0f}** |")
        for name, seconds, cpu, mb in self.rows:
            if name in OUTSIDE_TARGET:
                print(f"| {name} (not in the target) | {seconds:.1f} | {cpu:.1f} | {mb:,.0f} |")
        time_ok, memory_ok = total_s < TARGET_SECONDS, peak < TARGET_PEAK_MB
        print(f"targets: all stages < {TARGET_SECONDS} s: {'met' if time_ok else 'MISSED'};  "
              f"peak < {TARGET_PEAK_MB:,} MB: {'met' if memory_ok else 'MISSED'}"
              f"{'' if judge_main else ' (not judged: --embeddings-only)'}")
        met = (time_ok and memory_ok) or not judge_main
        extra = [row for row in self.rows if row[0] in EMBEDDING_STAGES]
        if extra:
            for name, seconds, cpu, mb in extra:
                print(f"| {name} | {seconds:.1f} | {cpu:.1f} | {mb:,.0f} |")
            seconds, peak = sum(row[1] for row in extra), max(row[3] for row in extra)
            time_ok, memory_ok = seconds < EMBEDDING_TARGET_SECONDS, peak < EMBEDDING_TARGET_PEAK_MB
            print(f"embedding refiner targets: < {EMBEDDING_TARGET_SECONDS} s: {'met' if time_ok else 'MISSED'} "
                  f"({seconds:.0f} s);  peak < {EMBEDDING_TARGET_PEAK_MB:,} MB: {'met' if memory_ok else 'MISSED'}")
            met &= time_ok and memory_ok
        return met


# ------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=N_TRAIN, help="training images")
    parser.add_argument("--test", type=int, default=N_TEST, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="append", default=[], metavar="STAGE",
                        choices=STAGES + EMBEDDING_STAGES, help="print this stage's cProfile (repeatable)")
    parser.add_argument("--embeddings", type=int, default=0, metavar="D",
                        help="also fit and apply the embedding refiner on D-wide features (2048: ResNeXt-101)")
    parser.add_argument("--embeddings-only", action="store_true",
                        help="with --embeddings: judge only the embedding stages' targets")
    args = parser.parse_args()
    if args.train < 100 * N_FOLDS or args.test < 1:
        parser.error(f"--train must be at least {100 * N_FOLDS} and --test at least 1")

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}, pandas {pd.__version__}, pyarrow {pa.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; "
          f"{resident_mb():,.0f} MB resident after the imports (torch's alone are ~500 MB)")
    start = time.perf_counter()
    images = synthetic_images(args.train, args.test, args.seed)
    train = images[images["split"] == "train"].set_index("image_id")
    test = images[images["split"] == "test"].set_index("image_id")
    header_columns = ["patient_id", "study_uid", "series_uid", "z", "path"]
    rates = " ".join(f"{name} {100 * rate:.2f}%" for name, rate in train[list(LABELS)].mean().items())
    print(f"data: {len(train):,} training images of {train['patient_id'].nunique():,} patients, "
          f"{len(test):,} test images of {test['patient_id'].nunique():,}; {rates}")

    stages = Stages(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        train_csv, sample_csv = Path(tmp) / "stage_2_train.csv", Path(tmp) / "stage_2_sample_submission.csv"
        write_id_label_csv(train_csv, train.index.to_numpy(), train[list(LABELS)].to_numpy())
        write_id_label_csv(sample_csv, test.index.to_numpy(), np.full((len(test), len(LABELS)), 0.5))
        print(f"files written in {time.perf_counter() - start:.0f} s: {train_csv.stat().st_size / 1e6:.0f} MB "
              f"of labels, {sample_csv.stat().st_size / 1e6:.0f} MB of sample submission\nstages:")

        labels = stages.run("labels", read_labels, train_csv)
        folds = stages.run("split", split_folds, labels, train[header_columns], args.seed)
        train_headers, test_headers = stages.run("slice order", with_slice_order, train[header_columns],
                                                 test[header_columns])
        if not (train_headers["position"] == train["position"]).all():
            sys.exit("order_slices did not recover the order along z")

        by_fold, test_tables = fold_predictions(labels, folds, train, test, args.seed)
        oof = stages.run("OOF assembly", assemble_oof, by_fold)
        refiner = stages.run("refiner", fit_oof_refiner, oof, train_headers, args.seed)
        averaged = stages.run("fold average", average, test_tables)
        refined = stages.run("refine test", refine_test, refiner, averaged, test_headers)
        problems = stages.run("submission", submit, refined, sample_csv, Path(tmp) / "submission.csv")
        stages.run("CSV outputs", write_outputs, oof, refiner, refined, Path(tmp))
        if args.embeddings:
            t0 = time.perf_counter()
            folders = write_features(by_fold, test, args.embeddings, Path(tmp), args.seed)
            size = sum(p.stat().st_size for f in folders for p in (f / "embeddings").glob("*.npy"))
            print(f"  (features written in {time.perf_counter() - t0:.0f} s: {size / 1e9:.2f} GB, "
                  f"{args.embeddings} wide, float16)", flush=True)
            embedding = stages.run("embedding refiner", fit_embedding_refiner, oof, train_headers, folders, args.seed)
            stages.run("embedding test", refine_test_members, embedding, test_tables, test_headers, folders)
            print(f"embedding refiner: OOF weighted log loss {embedding.loss_before:.4f} per slice -> "
                  f"{embedding.loss_after:.4f}; {embedding.settings}")

    print(f"\nrefiner: OOF weighted log loss {refiner.loss_before:.4f} per slice -> {refiner.loss_after:.4f} "
          f"refined (the stand-in's gain says nothing of a real model's); submission check: {problems or 'valid'}")
    print(f"load average at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0 if stages.report(judge_main=not args.embeddings_only) and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
