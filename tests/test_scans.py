"""utils.scans on folder trees as exports and CDs give them: nested, unnamed, mixed, damaged."""
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.data import get_testdata_file

from factories import build_export, make_ct, make_multiframe_ct, make_series, rewrite_dicom
from test_fuzz import _length_fields, _mutate
from utils.dicom import DicomError, read_header, read_hu
from utils.headers import scan_headers
from utils.scans import NO_GEOMETRY, OTHER_ORIENTATION, SKIPPED_COLUMNS, SLICE_COLUMNS, scan_folder
from utils.slices import order_slices

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

AXIAL = (1, 0, 0, 0, 1, 0)
TILT = math.radians(20)
# Row along x, column tilted 20 degrees out of y: normal (0, sin, cos), as a gantry tilt.
TILTED = (1, 0, 0, 0, math.cos(TILT), -math.sin(TILT))
CORONAL = (1, 0, 0, 0, 0, -1)  # normal along y: every slice has the same z
STEEP_TILT = math.radians(40)
STEEP = (1, 0, 0, 0, math.cos(STEEP_TILT), -math.sin(STEEP_TILT))  # the steepest gantry tilts
SCRAMBLE = [3, 0, 4, 1, 5, 2]  # slice i is written as IM000{SCRAMBLE[i]}: names say nothing


def test_a_nested_export_gives_each_ct_slice_once_and_a_reason_for_each_file_skipped(tmp_path, rsna_sample):
    root = tmp_path / "export"
    ct, skip = build_export(root, rsna_sample)
    scan = scan_folder(root)
    assert list(scan.slices.columns) == SLICE_COLUMNS and list(scan.skipped.columns) == SKIPPED_COLUMNS
    assert scan.slices["path"].is_unique
    assert dict(zip(scan.slices["path"], scan.slices["sop_uid"])) == ct
    reasons = dict(zip(scan.skipped["path"], scan.skipped["reason"]))
    assert set(reasons) == set(skip), reasons
    for path, part in skip.items():
        assert part in reasons[path], (path, reasons[path])
    assert "position" in reasons[next(p for p in skip if p.endswith("zz_copy"))]
    assert scan.n_non_dicom == 3  # README.TXT, viewer.exe, the empty file
    assert scan.n_files == len(ct) + len(skip) + 3  # the symlink loop added nothing
    rows = scan.model_rows()
    assert all(Path(p).is_absolute() and Path(p).is_file() for col in rows for p in rows[col])


def test_real_series_are_ordered_as_their_z_orders_them(tmp_path, rsna_sample):
    """The sample's series are gantry-tilted but stepped along z, as scanners do: the
    normal's order and z's order agree, and each series is 0..n-1 in (study, series) order."""
    root = tmp_path / "export"
    build_export(root, rsna_sample)
    slices = scan_folder(root).slices
    headers, _ = scan_headers(sorted(str(root / p) for p in slices["path"]))
    z = dict(zip(headers["path"], headers["z"]))
    for series, rows in slices.groupby("series", sort=False):
        assert rows["index"].tolist() == list(range(len(rows)))
        assert (rows["n_in_series"] == len(rows)).all()
        by_z = sorted(rows["path"], key=lambda p: z[str(root / p)])
        assert rows["path"].tolist() == by_z, series
        assert rows["prev_path"].tolist() == [by_z[0], *by_z[:-1]]
        assert rows["next_path"].tolist() == [*by_z[1:], by_z[-1]]
    assert slices.groupby("series").size().max() == 33
    keys = list(zip(slices["study_uid"], slices["series_uid"], slices["series"], slices["index"]))
    assert keys == sorted(keys)


def _tilted_positions(i: int) -> np.ndarray:
    """Slice i: 1 mm along the tilted normal, its field of view shifted +-10 mm along the
    column direction (in-plane, so no change along the normal, but 3.4 mm in z)."""
    normal = np.cross(TILTED[:3], TILTED[3:])
    return np.array([-120.0, -100.0, 40.0]) + i * 1.0 * normal + 10.0 * (-1) ** i * np.array(TILTED[3:])


def _coronal_positions(i: int) -> np.ndarray:
    return np.array([-120.0, -50.0 + 2.5 * i, 80.0])


def _steep_positions(i: int) -> np.ndarray:
    """2.5 mm along the 40-degree normal, shifted back along the column direction so that
    every slice has the same z."""
    normal = np.cross(STEEP[:3], STEEP[3:])
    column = np.array(STEEP[3:])
    return np.array([-120.0, -100.0, 40.0]) + 2.5 * i * normal - 2.5 * i * normal[2] / column[2] * column


def test_a_coronal_or_sagittal_reformat_is_skipped_not_predicted(tmp_path):
    make_series(tmp_path / "c", [_coronal_positions(i) for i in range(4)], CORONAL)
    scan = scan_folder(tmp_path)
    assert scan.slices.empty and len(scan.skipped) == 4
    assert scan.skipped["reason"].str.startswith("not an axial slice: its plane is 90 degrees").all()


@pytest.mark.parametrize("orientation,position,step", [(TILTED, _tilted_positions, 1.0),
                                                        (STEEP, _steep_positions, 2.5)],
                         ids=["tilted, in-plane shifts", "tilted 40 degrees, one z"])
def test_a_series_is_ordered_along_its_normal_where_z_alone_orders_it_wrong(tmp_path, orientation, position,
                                                                            step):
    names = [f"IM{SCRAMBLE[i]:04d}" for i in range(len(SCRAMBLE))]
    make_series(tmp_path / "s", [position(i) for i in range(len(names))], orientation, names,
                SpecificCharacterSet="ISO_IR 192", SeriesDescription="Schädel – nativ")
    slices = scan_folder(tmp_path).slices
    truth = [f"s/{n}" for n in names]
    assert slices["path"].tolist() == truth
    assert (slices["series_description"] == "Schädel – nativ").all()  # UTF-8, as written
    np.testing.assert_allclose(np.diff(slices["position_mm"]), step)
    assert (slices["note"] == "").all()
    # Training orders the same files by the same rule; by z it was neither this order nor its reverse.
    headers, _ = scan_headers(sorted((tmp_path / "s").iterdir()))
    assert order_slices(headers).sort_values("position").index.tolist() == names
    by_z = order_slices(headers.drop(columns=["normal_x"])).sort_values("position").index.tolist()
    assert by_z != names and by_z != names[::-1]


def test_a_slice_without_position_or_orientation_is_predicted_alone_and_noted(tmp_path):
    make_series(tmp_path / "s", [(0, 0, z) for z in (10.0, 5.0, 0.0)], AXIAL)
    make_ct(tmp_path / "s/no_position", np.full((8, 8), 1024), Modality="CT", SOPInstanceUID="1.2.3.5.8",
            ImagePositionPatient=None, ImageOrientationPatient=list(AXIAL))
    make_ct(tmp_path / "s/no_orientation", np.full((8, 8), 1024), Modality="CT", SOPInstanceUID="1.2.3.5.9",
            ImagePositionPatient=[0, 0, 2.5])
    scan = scan_folder(tmp_path)
    s = scan.slices.set_index("path")
    alone = ["s/no_orientation", "s/no_position"]
    assert set(s.index) == {"s/IM0000", "s/IM0001", "s/IM0002", *alone}
    assert (s.loc[alone, "note"] == NO_GEOMETRY).all() and s.loc[alone, "position_mm"].isna().all()
    assert (s.loc[alone, "n_in_series"] == 1).all()
    assert s.loc[alone, "prev_path"].tolist() == alone and s.loc[alone, "next_path"].tolist() == alone
    placed = s.drop(index=alone).sort_values("index")
    assert placed.index.tolist() == ["s/IM0002", "s/IM0001", "s/IM0000"]  # z 0, 5, 10
    assert (placed["n_in_series"] == 3).all() and (placed["note"] == "").all()
    assert scan.notes == {"without_position": 2, "other_orientation": 0}
    assert "2 without position" in scan.summary()


def test_a_slice_of_another_orientation_is_placed_along_the_first_slices_normal_and_noted(tmp_path):
    make_series(tmp_path / "s", [(0, 0, z) for z in (0.0, 5.0, 10.0)], AXIAL)
    make_series(tmp_path / "s", [(0, 0, 7.5)], TILTED, start=3)
    scan = scan_folder(tmp_path)
    s = scan.slices
    assert s["path"].tolist() == ["s/IM0000", "s/IM0001", "s/IM0003", "s/IM0002"]
    assert s["note"].tolist() == ["", "", OTHER_ORIENTATION, ""]
    assert scan.notes["other_orientation"] == 1


def test_a_multi_frame_object_is_an_error_for_the_readers_not_its_first_frame(tmp_path):
    path = make_multiframe_ct(tmp_path / "mf.dcm", np.full((3, 8, 8), 1024), Modality="CT")
    for read in (read_header, read_hu):
        with pytest.raises(DicomError, match=r"3 frames \(a multi-frame object\): not one slice"):
            read(path)


def test_no_patient_text_reaches_the_outputs(tmp_path, rsna_sample):
    marker = "Qzxv^Marker"
    tags = dict(PatientName=marker, PatientBirthDate="18990102", PatientID=f"PID{marker}",
                OtherPatientNames=marker, InstitutionName=marker, ReferringPhysicianName=marker)
    make_series(tmp_path / "a/s", [(0, 0, z) for z in (0.0, 5.0)], AXIAL, **tags)
    make_ct(tmp_path / "a/s/no_position", np.full((8, 8), 1024), Modality="CT", SOPInstanceUID="9.9",
            ImagePositionPatient=None, **tags)
    for i, source in enumerate(sorted(rsna_sample.glob("stage_2_test/*.dcm"))):
        rewrite_dicom(source, tmp_path / f"b/{i}", **tags)
    rewrite_dicom(get_testdata_file("MR_small.dcm"), tmp_path / "c/mr", **tags)
    data = (tmp_path / "b/0").read_bytes()
    (tmp_path / "c/damaged").write_bytes(data[:len(data) - 100])
    rewrite_dicom(tmp_path / "b/0", tmp_path / "c/colour", SamplesPerPixel=3)
    scan = scan_folder(tmp_path)
    assert len(scan.slices) == 3 + 5 and len(scan.skipped) == 3
    text = " ".join([scan.slices.to_csv(), scan.skipped.to_csv(), scan.model_rows().to_csv(),
                     scan.summary(), repr(scan.notes)])
    for secret in (marker, "Qzxv", "18990102"):
        assert secret not in text


def test_scanning_random_and_damaged_files_only_ever_returns_a_scan(tmp_path, rsna_sample):
    seeds = [Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm")),
             *sorted(rsna_sample.glob("stage_2_test/*.dcm"))]
    seeds.append(make_ct(tmp_path / "implicit.dcm", np.full((16, 16), 1064), implicit=True, Modality="CT",
                         ImageOrientationPatient=list(TILTED)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about MR_small's over-long SH values
        originals = [(p, p.read_bytes(), _length_fields(p, p.read_bytes())) for p in seeds]
    rng, root = random.Random(17), tmp_path / "tree"
    for n in range(400):
        folder = root / f"{rng.randrange(4)}" / f"{rng.randrange(3)}"
        folder.mkdir(parents=True, exist_ok=True)
        source, data, lengths = originals[n % len(originals)]
        kind = rng.random()
        if kind < 0.15:
            data = rng.randbytes(rng.randrange(600))
        elif kind < 0.25:  # the preamble's marker, then junk
            data = bytes(128) + b"DICM" + rng.randbytes(rng.randrange(400))
        elif kind < 0.9:
            data = _mutate(rng, data, lengths, min(len(data), data.find(b"\xe0\x7f\x10\x00") + 12))[0]
        (folder / f"f{n}").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about much of what damaged files hold
        scan = scan_folder(root)
    assert scan.n_files == 400
    assert len(scan.slices) + len(scan.skipped) + scan.n_non_dicom == 400
    assert scan.skipped["reason"].str.len().gt(0).all() and scan.slices["path"].is_unique
    # Copies of one seed that survive their mutation share its SOP UID: one slice each.
    assert 0 < len(scan.slices) <= len(seeds) and scan.n_non_dicom > 20
    kinds = set(scan.skipped["reason"].str.split(" ").str[:3].str.join(" "))
    assert len(kinds) >= 15 and "duplicate SOPInstanceUID: the" in kinds, kinds


def test_a_scan_in_processes_equals_the_scan_in_one(tmp_path):
    names = [f"IM{SCRAMBLE[i]:04d}" for i in range(len(SCRAMBLE))]
    make_series(tmp_path / "a", [_tilted_positions(i) for i in range(6)], TILTED, names)
    make_series(tmp_path / "b", [_coronal_positions(i) for i in range(6)], CORONAL, series_uid="1.2.3.6")
    (tmp_path / "b/notes.txt").write_text("not DICOM")
    one, many = scan_folder(tmp_path), scan_folder(tmp_path, workers=2, parallel_min=1)
    pd.testing.assert_frame_equal(one.slices, many.slices)
    pd.testing.assert_frame_equal(one.skipped, many.skipped)
    assert (one.n_files, one.n_non_dicom) == (many.n_files, many.n_non_dicom) == (13, 1)


def test_pydicoms_cd_tree_keeps_its_ct_slices_and_skips_its_index_scouts_and_other_modalities():
    root = Path(get_testdata_file("DICOMDIR")).parent
    scan = scan_folder(root)
    reasons = dict(zip(scan.skipped["path"], scan.skipped["reason"]))
    indexes = [p for p in reasons if Path(p).name.startswith("DICOMDIR")]
    assert len(indexes) >= 2 and all(reasons[p].startswith("a DICOMDIR") for p in indexes)
    assert any("localizer" in r for r in reasons.values())
    assert any("modality MR" in r for r in reasons.values())
    assert len(scan.slices) > 0 and (scan.slices["note"] == "").all()
    for _, rows in scan.slices.groupby("series"):
        assert rows["position_mm"].is_monotonic_increasing


def test_a_folder_that_is_not_one_is_an_error(tmp_path):
    with pytest.raises(NotADirectoryError):
        scan_folder(tmp_path / "absent")


def test_a_tree_without_ct_slices_gives_empty_tables(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/report.pdf").write_bytes(b"%PDF-1.4")
    rewrite_dicom(get_testdata_file("MR_small.dcm"), tmp_path / "docs/mr")
    for root, n_files in ((tmp_path / "empty", 0), (tmp_path / "docs", 2)):
        scan = scan_folder(root)
        assert list(scan.slices.columns) == SLICE_COLUMNS and scan.slices.empty
        assert scan.n_files == n_files and scan.model_rows().empty
    assert scan.skipped["reason"].tolist() == ["modality MR, not CT"] and scan.n_non_dicom == 1


def test_a_tilted_series_has_the_same_neighbours_in_training_as_in_predict(tmp_path):
    # 20 degrees of gantry tilt, and the image origin moving within the plane as the table
    # moves: the slices step 5 mm along the tilted normal while their z falls. One rule
    # (utils.slices.position_along_normal) orders both paths; by z the order was reversed.
    import kernel
    t = math.radians(20)
    row, col = np.array([1.0, 0, 0]), np.array([0, math.cos(t), math.sin(t)])
    normal = np.cross(row, col)
    positions = [k * 5 * normal - k * 15 * col for k in range(5)]
    assert np.all(np.diff([p[2] for p in positions]) < 0)  # z falls along the stack
    names = ["IM0003", "IM0001", "IM0004", "IM0000", "IM0002"]  # file order is no guide either
    paths = make_series(tmp_path / "scans", positions, [*row, *col], names=names)
    headers, bad = scan_headers(paths)
    assert bad.empty
    training = kernel.add_slice_order(headers.set_index("image_id"), "train")
    predicted = scan_folder(tmp_path).slices.set_index("path")
    stack = names  # the files of positions k = 0..4
    below = [stack[0], *stack[:-1]]  # an edge slice is its own neighbour
    above = [*stack[1:], stack[-1]]
    name = lambda paths: [Path(p).name for p in paths]  # noqa: E731
    assert name(training.loc[stack, "below"]) == below and name(training.loc[stack, "above"]) == above
    relative = [f"scans/{n}" for n in stack]
    assert name(predicted.loc[relative, "prev_path"]) == below and name(predicted.loc[relative, "next_path"]) == above
