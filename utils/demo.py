"""A small synthetic dataset in the Kaggle layout, for the demo run and the tests.

Real DICOM files written with pydicom: head-like phantoms (skull, brain, ventricles) with
hemorrhage-like lesions of each subtype spanning runs of neighbouring slices, as real
ones do, and unlabelled clot-like "mimics" that each appear on one slice alone (bone cut
obliquely, beam hardening, calcification), which only the neighbouring slices tell apart
from blood. The files carry the real dataset's header variants, so the demo exercises the
same reading paths as the competition data:

- 12 stored bits, unsigned, RescaleIntercept -1024, multi-valued windows ("00040\\00040");
- 16 stored bits, signed, "-1024.000000", -2000 padding outside the field of view;
- the 12-bit wrap: 12 stored bits, unsigned, RescaleIntercept 0, negative HU wrapped;
- one patient in four (whatever its variant) written with implicit VR, like part of the
  test set;
- duplicated rows in the label CSV, one truncated training file and one test file
  whose pixel data is shorter than its header says.

Besides the Kaggle files it keeps what Kaggle keeps back, for benchmarks: the test labels
(``test_truth.csv``) and where each test slice's lesions were drawn (``test_masks.npz``).
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from utils.atomic import atomic_write
from utils.labels import LABELS, SUBTYPES

AIR, BRAIN_HU, CSF_HU, BONE_HU, BLOOD_HU = -1000.0, 32.0, 5.0, 1200.0, 75.0
# kernel.py with no data given: settings small enough for a laptop CPU, trained from scratch
# because nothing can be downloaded; an explicit option still wins.
# Its heads differ in size (HEAD_SIZES), and cut to the head they train better on every seed
# measured (BENCHMARKS.md: bench_folds.py --compare-crop).
DEMO_PRESET = dict(arch="resnext50_32x4d", weights="none", image_size=64, batch_size=16,
                   lr=1e-3, val_frac=0.25, workers=min(2, os.cpu_count() or 1), crop="head")
VARIANTS = ("12bit_unsigned", "16bit_signed", "12bit_wrap")
TEST_MASKS = "test_masks.npz"  # image ID -> bool (size, size): its lesions, all subtypes
HEAD_SIZES = (0.6, 1.0)  # each patient's head, as a share of the largest: scanners frame heads differently


def _hex(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list("0123456789abcdef"), size=n))


def _phantom(rng, size: int, t: float, lesions: dict[str, dict], mimics: tuple = (), head: float = 1.0) -> np.ndarray:
    """One slice in HU; t in [-1, 1] is the height in the head, lesions keyed by subtype,
    mimics (x, y) centres of unlabelled foci as dense as blood and shaped like a clot, and
    ``head`` the head's size (1: it fills 80 % of the width)."""
    return _phantom_and_mask(rng, size, t, lesions, mimics, head)[0]


def _phantom_and_mask(rng, size: int, t: float, lesions: dict[str, dict],
                      mimics: tuple = (), head: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """_phantom's slice, and where its lesions are (bool, the union of the subtypes; the
    mimics are no lesion). Draws from ``rng`` exactly what _phantom draws."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    scale = np.sqrt(max(1.0 - (0.8 * t) ** 2, 0.2)) * head
    ax, ay = 0.40 * scale, 0.46 * scale
    r = np.sqrt((xx / ax) ** 2 + (yy / ay) ** 2)
    hu = np.full((size, size), AIR, dtype=np.float32)
    hu[r < 1.0] = BONE_HU
    inner = 0.88
    brain = r < inner
    hu[brain] = BRAIN_HU + 4.0 * np.sin(9 * xx[brain]) * np.cos(7 * yy[brain])
    ventricles = ((((xx - 0.06 * scale) / (0.05 * scale)) ** 2 + (yy / (0.14 * scale)) ** 2 < 1)
                  | (((xx + 0.06 * scale) / (0.05 * scale)) ** 2 + (yy / (0.14 * scale)) ** 2 < 1))
    ventricles &= abs(t) < 0.5
    hu[ventricles] = CSF_HU
    theta = np.arctan2(yy / ay, xx / ax)

    def clot(x: float, y: float) -> np.ndarray:  # a round clot in the brain, centre (x, y)
        return ((xx - x * ax) ** 2 + (yy - y * ay) ** 2 < (0.07 * scale) ** 2) & brain

    drawn = np.zeros((size, size), dtype=bool)
    for name, p in lesions.items():
        if name == "epidural":  # lens against the inner table
            cx, cy = np.cos(p["angle"]) * ax * 0.78, np.sin(p["angle"]) * ay * 0.78
            along = (xx - cx) * -np.sin(p["angle"]) + (yy - cy) * np.cos(p["angle"])
            across = (xx - cx) * np.cos(p["angle"]) + (yy - cy) * np.sin(p["angle"])
            mask = ((along / (0.13 * head)) ** 2 + (across / (0.06 * head)) ** 2 < 1) & brain
        elif name == "subdural":  # thin crescent along a long arc of the inner table
            d = np.angle(np.exp(1j * (theta - p["angle"])))
            mask = (r > inner - 0.10) & brain & (np.abs(d) < 1.2)
        elif name == "intraparenchymal":
            mask = clot(p["x"], p["y"])
        elif name == "intraventricular":  # blood filling the ventricles
            mask = ventricles if ventricles.any() else \
                (xx ** 2 + (yy / 2.5) ** 2 < (0.05 * scale) ** 2)
        else:  # subarachnoid: blood tracking along sulci, thin radial streaks
            mask = brain & (r > 0.45) & (r < inner - 0.04) & (np.cos(14 * theta + p["angle"]) > 0.75)
        hu[mask] = BLOOD_HU
        drawn |= mask
    for x, y in mimics:
        hu[clot(x, y)] = BLOOD_HU
    hu += rng.normal(0.0, 3.0, size=hu.shape).astype(np.float32)
    return hu, drawn


def _encode(hu: np.ndarray, variant: str) -> tuple[np.ndarray, dict]:
    """Stored values and rescale/window tags for one of the real header variants."""
    hu = np.rint(hu)
    if variant == "12bit_unsigned":
        stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
        tags = dict(BitsStored=12, HighBit=11, PixelRepresentation=0, RescaleIntercept="-1024",
                    RescaleSlope="1", WindowCenter="00040\\00040", WindowWidth="00080\\00080")
    elif variant == "16bit_signed":
        stored = np.clip(hu + 1024, -2000, 32767).astype(np.int16)
        size = hu.shape[0]
        yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
        stored[xx ** 2 + yy ** 2 > 0.25] = -2000  # outside the scanner's circular field of view
        tags = dict(BitsStored=16, HighBit=15, PixelRepresentation=1,
                    RescaleIntercept="-1024.000000", RescaleSlope="1.000000",
                    WindowCenter="30", WindowWidth="80")
    elif variant == "12bit_wrap":
        stored = (np.clip(hu, -1000, 3095).astype(np.int32) % 4096).astype(np.uint16)
        tags = dict(BitsStored=12, HighBit=11, PixelRepresentation=0, RescaleIntercept="0",
                    RescaleSlope="1.0", WindowCenter="00036\\00036", WindowWidth="00080\\00080")
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return stored, tags


def write_slice(path, hu: np.ndarray, variant: str, *, image_id: str, patient_id: str,
                study_uid: str, series_uid: str, z: float, implicit: bool = False,
                pixel_spacing: float = 0.488) -> None:
    """Write one CT slice as a DICOM file the way the RSNA files are written."""
    stored, tags = _encode(hu, variant)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = image_id  # the RSNA files put their IDs in UID tags
        ds.Modality = "CT"
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = ""
        ds.ImagePositionPatient = [-125.0, -125.0, round(float(z), 3)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.BitsAllocated = 16
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.PixelData = stored.tobytes()
        ds.save_as(path, enforce_file_format=True)


def _lesions_for(rng) -> dict[str, dict]:
    """0 to 2 subtypes for a patient, drawn so every subtype is common enough to learn."""
    n = rng.choice([0, 1, 2], p=[0.4, 0.4, 0.2])
    names = rng.choice(SUBTYPES, size=n, replace=False)
    return {str(name): {"angle": rng.uniform(-np.pi, np.pi), "x": rng.uniform(-0.4, 0.4),
                        "y": rng.uniform(-0.4, 0.4)} for name in names}


def _mimics_for(rng, n_slices: int) -> dict[int, tuple]:
    """Slice -> clot-like foci seen on that slice alone (most series have one or two).

    Real scans have them: bone cut obliquely at the skull base, beam-hardening streaks,
    calcifications. On one slice they look like a small bleed; a radiologist tells them
    apart by scrolling, since blood continues onto the next slice and they do not.
    """
    n = int(rng.choice([0, 1, 2], p=[0.2, 0.4, 0.4]))
    slices = rng.choice(n_slices, size=n, replace=False)
    return {int(s): ((float(rng.uniform(-0.4, 0.4)), float(rng.uniform(-0.4, 0.4))),) for s in slices}


def make_demo_dataset(root, n_train_patients: int = 36, n_test_patients: int = 8,
                      slices: tuple[int, int] = (10, 14), size: int = 128, seed: int = 0,
                      head_sizes: tuple[float, float] = HEAD_SIZES) -> Path:
    """Write the demo dataset under ``root`` (created; replaced atomically) and return it.
    Each patient's head size is drawn uniformly from ``head_sizes`` (another scanner's framing).

    ``TEST_MASKS`` holds a mask for every test slice, empty where test_truth.csv says "any" 0;
    the damaged test file keeps the mask of the pixels it was meant to hold."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mimic_rng = np.random.default_rng([seed, 1])  # its own stream: the rest is as without mimics
    head_rng = np.random.default_rng([seed, 2])  # each patient's head size, a stream of its own too

    def write(tmp: Path) -> None:
        used: set[str] = set()
        label_rows = _write_patients(tmp / "stage_2_train", n_train_patients, (rng, mimic_rng, head_rng), used, slices,
                                     size, head_sizes=head_sizes)
        test_masks: dict[str, np.ndarray] = {}
        sample_rows = _write_patients(tmp / "stage_2_test", n_test_patients, (rng, mimic_rng, head_rng), used,
                                      slices, size, masks=test_masks, head_sizes=head_sizes)
        _add_faults(tmp, size)
        label_rows += label_rows[:2]  # the real label file repeats some images, identically
        _write_csv(tmp / "stage_2_train.csv", [(i, v) for rows in label_rows for i, v in rows])
        _write_csv(tmp / "stage_2_sample_submission.csv", [(i, 0.5) for rows in sample_rows for i, _ in rows])
        # The answers to the test set, which Kaggle keeps: benchmarks score submissions with them.
        _write_csv(tmp / "test_truth.csv", [(i, v) for rows in sample_rows for i, v in rows])
        with open(tmp / TEST_MASKS, "wb") as f:  # inside the folder that is renamed into place
            np.savez_compressed(f, **test_masks)
        (tmp / "README.txt").write_text(
            "Synthetic RSNA-shaped demo data written by utils/demo.py; not real patients.\n")
        if root.exists():
            shutil.rmtree(root)
    return atomic_write(root, write)


def _write_patients(folder: Path, n_patients: int, rngs: tuple, used: set, slices: tuple[int, int],
                    size: int, masks: dict | None = None,
                    head_sizes: tuple[float, float] = HEAD_SIZES) -> list[list[tuple[str, int]]]:
    """Each patient's series of slices; per slice, its six (row ID, label) pairs. ``rngs``:
    the main stream, the mimics' and the head sizes'. With ``masks``, each slice's lesion
    mask goes there under its image ID."""
    rng, mimic_rng, head_rng = rngs
    folder.mkdir(parents=True)
    out = []
    for p in range(n_patients):
        head = float(head_rng.uniform(*head_sizes))  # a child's head, a wide field of view
        variant = VARIANTS[p % len(VARIANTS)]
        patient, study, series = f"ID_{_hex(rng, 8)}", f"ID_{_hex(rng, 10)}", f"ID_{_hex(rng, 10)}"
        n_slices = int(rng.integers(slices[0], slices[1] + 1))
        lesions = _lesions_for(rng)
        runs = {}
        for name in lesions:
            length = int(rng.integers(3, max(4, n_slices // 2) + 1))
            start = int(rng.integers(1, n_slices - length))
            runs[name] = range(start, start + length)
        mimics = _mimics_for(mimic_rng, n_slices)
        z0 = float(rng.uniform(-50, 150))
        for s in range(n_slices):
            image_id = f"ID_{_hex(rng, 9)}"
            while image_id in used:
                image_id = f"ID_{_hex(rng, 9)}"
            used.add(image_id)
            present = {k: v for k, v in lesions.items() if s in runs[k]}
            t = -0.7 + 1.4 * s / max(n_slices - 1, 1)
            hu, drawn = _phantom_and_mask(rng, size, t, present, mimics.get(s, ()), head)
            if masks is not None:
                masks[image_id] = drawn
            write_slice(folder / f"{image_id}.dcm", hu, variant, image_id=image_id, patient_id=patient,
                        study_uid=study, series_uid=series, z=z0 + 5.0 * s, implicit=(p % 4 == 3))
            y = [int(name in present) for name in SUBTYPES]
            y.append(int(any(y)))
            out.append([(f"{image_id}_{name}", v) for name, v in zip(LABELS, y)])
    return out


def _add_faults(root: Path, size: int) -> None:
    """Faults the real data has: a truncated file, pixel data short of what the header says."""
    train_file = sorted((root / "stage_2_train").glob("*.dcm"))[0]
    data = train_file.read_bytes()
    train_file.write_bytes(data[:len(data) // 3])
    test_file = sorted((root / "stage_2_test").glob("*.dcm"))[0]
    data = test_file.read_bytes()
    test_file.write_bytes(data[:-size * 4])


def _write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        f.write("ID,Label\n")
        f.writelines(f"{i},{v}\n" for i, v in rows)


def write_plain_slices(folder, n: int, size: int = 512, seed: int = 0) -> list[Path]:
    """``n`` lesion-free slices of ``size`` pixels in every header variant (for benchmarks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"ID_{i:09x}.dcm"
        write_slice(path, _phantom(rng, size, -0.5 + i / max(n, 1), {}), VARIANTS[i % len(VARIANTS)],
                    image_id=path.stem, patient_id="ID_00000000", study_uid="ID_0000000001",
                    series_uid="ID_0000000002", z=5.0 * i, implicit=i % 2 == 1)
        paths.append(path)
    return paths
