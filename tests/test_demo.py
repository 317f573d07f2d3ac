"""utils.demo: the synthetic dataset has the real data's layout, variants and faults."""
import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import ndimage

from utils.demo import BLOOD_HU, TEST_MASKS, make_demo_dataset
from utils.dicom import DicomError, read_hu
from utils.headers import scan_headers
from utils.labels import LABELS, read_labels


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_train_patients=6,
                             n_test_patients=3, seed=11)


def test_layout_labels_and_faults(demo):
    for name in ("stage_2_train.csv", "stage_2_sample_submission.csv", "stage_2_train", "stage_2_test"):
        assert (demo / name).exists()
    raw = pd.read_csv(demo / "stage_2_train.csv")
    assert raw.duplicated().sum() == 12  # two images repeated, identically
    labels = read_labels(demo / "stage_2_train.csv")
    assert list(labels.columns) == list(LABELS)
    assert (labels["any"] == labels[list(LABELS[:5])].max(axis=1)).all()
    sample = pd.read_csv(demo / "stage_2_sample_submission.csv")
    assert (sample["Label"] == 0.5).all() and len(sample) % 6 == 0
    for split, ids in (("train", labels.index), ("test", sample["ID"].str[:12].unique())):
        files = sorted((demo / f"stage_2_{split}").glob("*.dcm"))
        assert {f.stem for f in files} == set(ids)
        headers, bad = scan_headers(files)
        assert len(bad) == 1 and "pixel data is short" in bad.loc[0, "reason"]


def test_test_truth_answers_the_sample_submission_with_the_drawn_lesions(demo):
    truth = pd.read_csv(demo / "test_truth.csv")
    sample = pd.read_csv(demo / "stage_2_sample_submission.csv")
    assert truth["ID"].tolist() == sample["ID"].tolist() and set(truth["Label"]) <= {0, 1}
    wide = truth.assign(image=truth["ID"].str[:12], label=truth["ID"].str[13:]).pivot(
        index="image", columns="label", values="Label")[list(LABELS)]
    assert (wide["any"] == wide[list(LABELS[:5])].max(axis=1)).all() and wide["any"].sum() > 0
    # a labelled bleed is blood-dense somewhere inside the head: compare with the pixels
    damaged, checked = [], 0
    for image_id, row in wide.iterrows():
        path = demo / "stage_2_test" / f"{image_id}.dcm"
        try:
            hu = read_hu(path)
        except DicomError:
            damaged.append(image_id)
            continue
        if row["any"]:
            assert ((hu > BLOOD_HU - 15) & (hu < BLOOD_HU + 15)).sum() > 10, image_id
            checked += 1
    assert len(damaged) == 1 and checked == wide["any"].sum() - wide.loc[damaged, "any"].sum()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # RSNA IDs in UID tags, on purpose
def test_header_variants_of_the_real_data(demo):
    headers, _ = scan_headers(sorted((demo / "stage_2_train").glob("*.dcm")))
    variants = set(zip(headers["bits_stored"], headers["pixel_representation"], headers["rescale_intercept"],
                       headers["multi_window"]))
    assert (12, 0, -1024.0, True) in variants and (16, 1, -1024.0, False) in variants
    assert (12, 0, 0.0, True) in variants  # the 12-bit wrap
    assert set(headers["transfer_syntax"]) == {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
    signed = headers.loc[headers["pixel_representation"] == 1, "path"].iloc[0]
    assert read_hu(signed).min() == -2000 - 1024  # padding outside the field of view
    wrapped = headers.loc[headers["rescale_intercept"] == 0, "path"].iloc[0]
    assert read_hu(wrapped).min() >= -1000 - 20  # air, once the wrap is undone (plus noise)
    ds = pydicom.dcmread(signed, stop_before_pixels=True)
    assert ds.SOPInstanceUID.startswith("ID_")  # like the RSNA files, not a real UID


def test_lesions_run_over_neighbouring_slices(demo):
    labels = read_labels(demo / "stage_2_train.csv")
    headers, _ = scan_headers(sorted((demo / "stage_2_train").glob("*.dcm")))
    h = headers.set_index("image_id").join(labels, how="inner").sort_values(["series_uid", "z"])
    for _, series in h.groupby("series_uid"):
        for label in LABELS[:5]:
            on = np.flatnonzero(series[label].to_numpy())
            assert len(on) == 0 or on[-1] - on[0] + 1 == len(on)  # one unbroken run along z


def test_mimics_look_like_blood_on_one_slice_only(demo):
    # Unlabelled foci as dense as blood, each on one slice: what neighbours tell apart.
    labels = read_labels(demo / "stage_2_train.csv")
    headers, _ = scan_headers(sorted((demo / "stage_2_train").glob("*.dcm")))
    h = headers.set_index("image_id").join(labels, how="inner").sort_values(["series_uid", "z"])
    mimics = 0
    for _, series in h.groupby("series_uid"):
        dense = [(np.abs(read_hu(path) - BLOOD_HU) < 12) for path in series["path"]]
        clear = series["any"].to_numpy() == 0
        for s in np.flatnonzero(clear & np.array([mask.sum() > 20 for mask in dense])):
            mimics += 1
            for t in (s - 1, s + 1):
                if 0 <= t < len(dense):
                    assert (dense[s] & dense[t]).sum() < 5  # nothing there on the next slice
    assert mimics >= 3


def test_test_masks_mark_the_drawn_lesions(demo):
    truth = pd.read_csv(demo / "test_truth.csv")
    any_rows = truth[truth["ID"].str.endswith("_any")]
    lesion = any_rows.set_index(any_rows["ID"].str[:12])["Label"]
    with np.load(demo / TEST_MASKS) as z:
        masks = {k: z[k] for k in z.files}
    assert set(masks) == set(lesion.index)  # one per test slice, lesion or not
    assert all(m.dtype == bool and m.shape == (128, 128) for m in masks.values())
    assert {k: bool(m.any()) for k, m in masks.items()} == (lesion == 1).to_dict()
    checked, damaged = 0, 0
    for image_id in lesion.index[lesion == 1]:
        try:
            hu = read_hu(demo / "stage_2_test" / f"{image_id}.dcm")
        except DicomError:  # the demo's one damaged test file, if it is a positive
            damaged += 1
            continue
        mask = masks[image_id]
        assert (np.abs(hu[mask] - BLOOD_HU) < 15).mean() > 0.99, image_id  # blood, all of it
        ring = ndimage.binary_dilation(mask, iterations=2) & ~mask & (hu < 500)  # no bone
        assert hu[mask].mean() > hu[ring].mean() + 25, image_id  # brighter than around it
        checked += 1
    assert checked >= 5 and damaged <= 1 and checked + damaged == (lesion == 1).sum()


def test_head_sizes_frame_the_heads_of_a_draw(tmp_path):
    from utils.crop import HEAD_HU, head_box
    sides = {}
    for heads in ((0.35, 0.35), (1.0, 1.0)):
        data = make_demo_dataset(tmp_path / str(heads[0]), n_train_patients=2, n_test_patients=1, seed=3,
                                 size=64, head_sizes=heads)
        headers, _ = scan_headers(sorted((data / "stage_2_train").glob("*.dcm")))  # the damaged file left out
        boxes = [head_box(read_hu(p) > HEAD_HU) for p in headers["path"]]
        sides[heads] = np.median([b[2] for b in boxes if b])
    assert sides[(0.35, 0.35)] < 0.5 * sides[(1.0, 1.0)]
