"""utils.dataset: a folder of a site's own scans and its label CSV as the one slice table."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from factories import build_labelled_export, make_enhanced_ct, make_nifti, place_file, read_dicom, rewrite_dicom
from utils.dataset import HEADER_COLUMNS, labelled_folder, read_folder_labels
from utils.labels import LABELS, SUBTYPES, LabelError

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


@pytest.fixture
def export(tmp_path, rsna_sample):
    root = tmp_path / "export"
    return root, build_labelled_export(root, rsna_sample)


def write_csv(path, rows: pd.DataFrame) -> str:
    rows.to_csv(path, index=False, float_format="%.0f")
    return path


def test_slice_rows_series_rows_and_an_absent_column(export, tmp_path):
    root, truth = export
    first, second = sorted(truth["series_uid"].unique())
    by_slice = truth[truth["series_uid"] == first].drop(columns=["series_uid", "sop_uid", "epidural"]).reset_index()
    # the second series: one row, its own labels as a site gives them (positive if any slice is)
    series_row = truth[truth["series_uid"] == second][list(LABELS)].max().drop("epidural")
    rows = pd.concat([by_slice, pd.DataFrame([{"series_uid": second, **series_row}])], ignore_index=True)
    data = labelled_folder(root, write_csv(tmp_path / "labels.csv", rows))

    assert list(data.headers.columns) == HEADER_COLUMNS and data.labels.index.equals(data.headers.index)
    assert len(data.labels) == len(truth) and set(data.labels.index) == set(truth.index)
    assert data.labels["epidural"].isna().all()  # absent: unknown, never 0
    mine = truth.loc[by_slice["path"], list(LABELS[1:])]
    np.testing.assert_array_equal(data.labels.loc[mine.index, list(LABELS[1:])], mine)
    theirs = data.labels.loc[truth.index[truth["series_uid"] == second]]
    for c in LABELS[1:]:  # a series-level 0 is every slice's 0; a 1 leaves the slices unknown
        assert (theirs[c] == 0).all() if series_row[c] == 0 else theirs[c].isna().all()
    assert series_row.sum() > 0 and theirs.isna().any().any()  # the case is exercised
    assert list(data.series_labels.index) == [data.headers.loc[theirs.index[0], "series"]]
    # patients: PatientID, pseudonymised; paths absolute, series ordered
    assert data.headers["patient_id"].nunique() == 2 and data.headers["patient_id"].str.startswith("patient_").all()
    assert not any(p in " ".join(data.headers["patient_id"]) for p in truth.index.str.split("/").str[0])
    assert data.headers.groupby("series")["position"].apply(lambda p: sorted(p) == list(range(len(p)))).all()
    assert all(str(root) in p for p in data.headers["path"])


def test_slices_named_by_sop_uid_and_unlabelled_slices_are_left_out(export, tmp_path):
    root, truth = export
    some = truth.iloc[::3]
    rows = some.reset_index()[["sop_uid", "any", "subdural"]]
    data = labelled_folder(root, write_csv(tmp_path / "labels.csv", rows))
    assert sorted(data.labels.index) == sorted(some.index)
    np.testing.assert_array_equal(data.labels.loc[some.index, ["any", "subdural"]], some[["any", "subdural"]])
    assert data.labels[list(SUBTYPES[:4])].isna().all().all()


def test_frames_of_a_multiframe_file_are_named_by_frame(tmp_path, rsna_sample):
    sources = sorted((rsna_sample / "stage_2_train").glob("ID_*.dcm"))[:4]
    make_enhanced_ct(tmp_path / "scans" / "ct", sources)
    uid = read_dicom(tmp_path / "scans" / "ct").SeriesInstanceUID
    rows = pd.DataFrame({"path": ["ct", "ct::frame=1", ""], "series_uid": ["", "", uid], "frame": ["2", "", "3"],
                         "any": [1, 0, 1]})
    rows.to_csv(tmp_path / "labels.csv", index=False)
    data = labelled_folder(tmp_path / "scans", tmp_path / "labels.csv")
    assert data.labels["any"].to_dict() == {"ct::frame=1": 0.0, "ct::frame=2": 1.0, "ct::frame=3": 1.0}
    assert data.series_labels.empty  # a series_uid with a frame names a slice
    (tmp_path / "bad.csv").write_text("path,any\nct,1\n")
    with pytest.raises(LabelError, match=r"bad.csv: line 2: ct holds 4 slices: give the frame"):
        labelled_folder(tmp_path / "scans", tmp_path / "bad.csv")


@pytest.mark.parametrize("text, message", [
    ("path,any\n{a},1\n{a},0\n", r"lines 2, 3: the same slice .* labelled twice"),
    ("path,any\n{a},2\n", r"line 2: any must be 0, 1 or empty \(unknown\), got '2'"),
    ("path,any\nnowhere/IM9,1\n", r"line 2: no CT slice found under the folder is path nowhere/IM9"),
    ("path,sop_uid,any\n{a},x,1\n", r"line 2: give exactly one of path, sop_uid"),
    ("series_uid,any\n1.2.3.4,1\n", r"line 2: no series of CT slices found .* series_uid 1.2.3.4"),
    ("series_uid,frame,any\n{s},3,1\n", r"line 2: no CT slice found under the folder is frame 3 of series_uid"),
    ("path,subdral\n{a},1\n", r"line 1: unknown columns \['subdral'\]"),
    ("any,subdural\n1,0\n", r"line 1: no key column"),
    ("path\n{a}\n", r"line 1: no label column"),
    ("path,any\n", r"no label rows"),
    ("path,any\n{a},1,5\n", r"line 2: 3 fields, but the header names 2"),
    ("path,any,any\n{a},1,1\n", r"line 1: columns named twice: \['any'\]"),
    ("path,any\n{a},\x001\n", r"line 2: any must be 0, 1 or empty \(unknown\), got '\\x001'"),
    ("path,any\nscout/IM0,1\n", r"line 2: scout/IM0 was not read as a CT slice: a localizer"),
])
def test_label_file_errors_name_the_file_and_the_line(export, tmp_path, text, message):
    root, truth = export
    rewrite_dicom(root / truth.index[0], root / "scout/IM0", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                  SOPInstanceUID="ID_scout", SeriesInstanceUID="ID_scout_series")
    (tmp_path / "labels.csv").write_text(text.format(a=truth.index[0], s=truth["series_uid"].iloc[0]))
    with pytest.raises(LabelError, match=r"labels.csv: " + message):
        labelled_folder(root, tmp_path / "labels.csv")


def test_a_series_labelled_0_with_a_slice_labelled_1_is_a_contradiction(export, tmp_path):
    root, truth = export
    positive = truth[truth["any"] == 1].index[0]
    (tmp_path / "labels.csv").write_text(f"path,series_uid,any\n{positive},,1\n,{truth.at[positive, 'series_uid']},0\n")
    with pytest.raises(LabelError, match=r"line 3: series .* is labelled any 0, but its slice .* is labelled any 1"):
        labelled_folder(root, tmp_path / "labels.csv")


def test_the_csv_parser_on_its_own(tmp_path):
    # Excel's byte-order mark and line ends, a blank line: the line numbers stay the file's
    (tmp_path / "l.csv").write_bytes("\ufeffpath, frame, any ,subdural\r\n./a\\b, 1, 1,\r\n\r\nc,,0,1\r\n".encode())
    table = read_folder_labels(tmp_path / "l.csv")
    assert table["value"].tolist() == ["a/b", "c"] and table["frame"].tolist() == [1, pd.NA]
    assert table["line"].tolist() == [2, 4] and table["kind"].eq("slice").all()
    np.testing.assert_array_equal(table[["any", "subdural", "epidural"]], [[1, np.nan, np.nan], [0, 1, np.nan]])
    place_file(None, tmp_path / "bin.csv", bytes(range(256)) * 4)
    with pytest.raises(LabelError, match="bin.csv: "):
        read_folder_labels(tmp_path / "bin.csv")


def test_the_readmes_example_label_file_parses(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("**The label CSV**", 1)[1].split("```csv\n", 1)[1].split("```", 1)[0]
    (tmp_path / "labels.csv").write_text(example)
    table = read_folder_labels(tmp_path / "labels.csv")
    assert table["kind"].tolist() == ["slice", "slice", "slice", "series"]
    assert table["frame"].tolist()[2] == 12 and table["epidural"].isna().all()
    assert table["any"].tolist() == [0, 1, 1, 1]


def test_slices_of_a_nifti_volume_are_named_by_path_or_series_and_slice_index(tmp_path, rsna_sample):
    pytest.importorskip("nibabel")
    sources = sorted((rsna_sample / "stage_2_train").glob("ID_*.dcm"))[:4]
    make_nifti(tmp_path / "scans" / "head.nii.gz", sources)
    (tmp_path / "labels.csv").write_text("path,series_uid,frame,subdural\nhead.nii.gz,,0,1\n,head.nii.gz,2,0\n")
    data = labelled_folder(tmp_path / "scans", tmp_path / "labels.csv")
    assert data.labels["subdural"].to_dict() == {"head.nii.gz::slice=0": 1.0, "head.nii.gz::slice=2": 0.0}


def test_the_kaggle_layout_read_as_a_labelled_folder_gives_the_kaggle_adapters_table(tmp_path, rsna_sample):
    import kernel
    from utils.headers import scan_headers
    from utils.labels import read_labels
    labels = read_labels(rsna_sample / "stage_2_train.csv")
    headers, bad = scan_headers(sorted((rsna_sample / "stage_2_train").glob("*.dcm")))
    kaggle = kernel.add_slice_order(headers.set_index("image_id"), "train")
    labels.rename(index=lambda i: f"{i}.dcm").rename_axis("path").reset_index().to_csv(tmp_path / "l.csv", index=False)
    folder = labelled_folder(rsna_sample / "stage_2_train", tmp_path / "l.csv")
    ids = folder.labels.index.str.removesuffix(".dcm")
    assert bad.empty and sorted(ids) == sorted(labels.index)
    np.testing.assert_array_equal(folder.labels.to_numpy(), labels.loc[ids].to_numpy())
    k = kaggle.loc[ids]
    name = lambda paths: [Path(p).stem for p in paths]  # noqa: E731
    assert folder.headers["position"].tolist() == k["position"].tolist()  # one slice order
    assert name(folder.headers["below"]) == name(k["below"]) and name(folder.headers["above"]) == name(k["above"])
    same_patient = lambda g: pd.factorize(np.asarray(g))[0].tolist()  # noqa: E731
    assert same_patient(folder.headers["patient_id"]) == same_patient(k["patient_id"])
    assert same_patient(folder.headers["series"]) == same_patient(k["series"])
