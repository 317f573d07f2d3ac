"""kernel.py --predict DIR: a trained model on a folder of the user's own scans."""
import html
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from kernel_runs import TINY, cli, run_kernel
from factories import (GDCM_SYNTAXES, build_export, compress_with_gdcm, make_enhanced_ct, make_nifti, place_file,
                       read_dicom, rewrite_dicom, screenshot)
from utils.labels import LABELS
from utils.series_results import series_table, top_slices

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
MARKER = "Zyxwvut^Privacy"  # a patient name no output may hold


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    # --crop head: training, --predict-only and --predict DIR (every format) all cut to the head
    result = run_kernel("--out-dir", out, *TINY, "--refine", "--val-frac", "0.5", "--crop", "head")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["crop"] == "head"
    return out


@pytest.mark.slow
def test_a_nested_export_is_predicted_slice_by_slice_and_series_by_series(trained, tmp_path, rsna_sample):
    root = tmp_path / "export"
    ct, skip = build_export(root, rsna_sample)
    for rel in ct:
        rewrite_dicom(root / rel, root / rel, PatientName=MARKER, PatientBirthDate="19010203", PatientID=MARKER)
    out = tmp_path / "pred"
    # a low threshold: every series is positive, so predict.html draws heatmaps for each
    result = run_kernel("--predict", root, "--checkpoint", trained, "--out-dir", out,
                        "--threshold", "0.01", "--workers", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    slices = pd.read_csv(out / "slices.csv", dtype={"path": str})
    assert sorted(slices["path"]) == sorted(ct)  # every CT slice, once
    assert dict(zip(slices["path"], slices["sop_uid"])) == ct
    skipped = dict(pd.read_csv(out / "skipped.csv").itertuples(index=False))
    assert set(skipped) == set(skip) and all(part in skipped[p] for p, part in skip.items())
    probs = slices[list(LABELS)].to_numpy()
    assert np.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()

    series = pd.read_csv(out / "series.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(series, series_table(pd.read_csv(out / "slices.csv", keep_default_na=False), 0.01),
                                  check_dtype=False)
    assert series["n_slices"].sum() == len(slices) and (series["flag"] == "positive").all()
    page = (out / "report" / "predict.html").read_text()
    assert page.count("alt='heatmap'") == sum(min(3, n) for n in series["n_slices"])
    assert page.count("alt='probabilities along the series'") == len(series)
    for path in out.rglob("*"):
        if path.is_file():
            assert MARKER.split("^")[0] not in path.read_text(errors="replace"), path
            assert "19010203" not in path.read_text(errors="replace"), path
    # what a browser draws: the plots and the heatmaps, with the slices' black among them
    shot = cv2.imread(str(screenshot(out / "report" / "predict.html", tmp_path / "shot.png", tmp_path / "profile")))
    assert shot is not None and shot.shape[:2] == (3000, 1200) and shot.std() > 5
    assert (shot < 30).all(axis=2).mean() > 0.01


def _copy_series(root: Path, sources: list, fmt: str, order: list) -> None:
    """The real series ``sources`` (inferior first) in one format, as a series of its own."""
    uid = lambda ds, name: f"{fmt}.{ds[name].value}"  # noqa: E731
    if fmt in GDCM_SYNTAXES:
        for i in order:
            ds = read_dicom(sources[i])
            copy = rewrite_dicom(sources[i], root / fmt / Path(sources[i]).name, StudyInstanceUID=uid(ds, "StudyInstanceUID"),
                                 SeriesInstanceUID=uid(ds, "SeriesInstanceUID"), SOPInstanceUID=uid(ds, "SOPInstanceUID"))
            compress_with_gdcm(copy, copy, fmt)
    elif fmt.startswith("Enhanced CT"):
        ds = read_dicom(sources[0])
        make_enhanced_ct(root / fmt / f"{ds.SeriesInstanceUID}.dcm", [sources[i] for i in order],
                         fmt.partition(" in ")[2] or None, StudyInstanceUID=uid(ds, "StudyInstanceUID"),
                         SeriesInstanceUID=uid(ds, "SeriesInstanceUID"))
    else:
        make_nifti(root / fmt / f"{read_dicom(sources[0]).SeriesInstanceUID}.nii.gz", sources,
                   "mirrored" if "mirrored" in fmt else "as_dicom")


FORMATS = [*GDCM_SYNTAXES, "Enhanced CT", "Enhanced CT in JPEG 2000 Lossless", "NIfTI", "NIfTI mirrored"]


@pytest.mark.slow
def test_every_format_gives_the_probabilities_and_order_of_the_uncompressed_files(trained, tmp_path, rsna_sample):
    """The real series written losslessly in each compressed syntax, as Enhanced CT files and
    as NIfTI volumes, next to the files themselves: --predict gives each slice the
    probabilities of its uncompressed file and the same place in its series (the run's
    refiner reads each series in that order)."""
    root = tmp_path / "scans"
    series = {}
    for path in sorted((rsna_sample / "stage_2_train").glob("*.dcm")):
        series.setdefault(read_dicom(path).SeriesInstanceUID, []).append(path)
    for uid, paths in series.items():
        paths.sort(key=lambda p: float(read_dicom(p).ImagePositionPatient[2]))
        for p in paths:
            place_file(p, root / "original" / p.name)
        order = list(np.random.default_rng(0).permutation(len(paths)))  # files and frames out of order
        for fmt in FORMATS:
            _copy_series(root, paths, fmt, order)
    out = tmp_path / "pred"
    result = run_kernel("--predict", root, "--checkpoint", trained, "--out-dir", out, "--workers", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    slices = pd.read_csv(out / "slices.csv", keep_default_na=False)
    assert (pd.read_csv(out / "skipped.csv").empty and len(slices) == 65 * (1 + len(FORMATS)))
    slices["folder"] = slices["file"].str.split("/").str[0]
    slices["series_key"] = slices["series_uid"].str.extract(r"(ID_[0-9a-f]+)", expand=False)  # the RSNA series
    expected = slices[slices["folder"] == "original"].set_index(["series_key", "index"])[list(LABELS)]
    assert len(expected) == 65
    for fmt in FORMATS:
        got = slices[slices["folder"] == fmt].set_index(["series_key", "index"])[list(LABELS)]
        assert len(got) == 65 and got.index.equals(got.index.unique()), fmt
        np.testing.assert_allclose(got.loc[expected.index].to_numpy(), expected.to_numpy(), atol=1e-4, err_msg=fmt)
    formats = set(slices["format"])
    assert formats == {"DICOM (uncompressed)", "DICOM (RLE)", "DICOM (JPEG-LS lossless)", "DICOM (JPEG 2000 lossless)",
                       "DICOM (JPEG lossless SV1)", "Enhanced CT (uncompressed)", "Enhanced CT (JPEG 2000 lossless)",
                       "NIfTI-1 (gzip)"}
    series_csv = pd.read_csv(out / "series.csv", keep_default_na=False)
    assert len(series_csv) == 2 * (1 + len(FORMATS)) and set(series_csv["format"]) == formats
    page = (out / "report" / "predict.html").read_text()
    assert all(f"<td>{html.escape(f)}</td>" in page for f in formats)  # the triage table names each


@pytest.mark.slow
def test_the_folder_gets_the_runs_own_predictions_refiner_included(trained, tmp_path):
    """The demo's test images as a folder: the same probabilities as the run's own
    --predict-only (its refiner along each series), whatever the names and nesting."""
    data = trained / "demo_data"
    # the reference in this process (cli); --predict DIR runs as a user runs it
    assert cli("--predict-only", "--checkpoint", trained, "--data-dir", data,
               "--out-dir", tmp_path / "p", "--workers", "0") == 0
    expected = pd.read_csv(tmp_path / "p" / "test_predictions.csv").set_index("image_id")
    root = tmp_path / "scans"
    for i, source in enumerate(sorted((data / "stage_2_test").glob("*.dcm"))):
        target = root / f"disk{i % 2}" / f"IMG{i:05d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    result = run_kernel("--predict", root, "--checkpoint", trained, "--out-dir", tmp_path / "pred", "--workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    slices = pd.read_csv(tmp_path / "pred" / "slices.csv").set_index("sop_uid")
    assert len(slices) >= 20
    np.testing.assert_allclose(slices[list(LABELS)].to_numpy(), expected.loc[slices.index].to_numpy(),
                               rtol=1e-5, atol=1e-7)
    # the run's refiner, where it was used, is saved and so part of what was compared above
    assert json.loads((trained / "metrics.json").read_text())["refiner_used"] == (trained / "refiner.pt").is_file()


def test_series_table_against_a_hand_made_case():
    rows = []
    for i, (p_any, p_sdh) in enumerate([(0.1, 0.05), (0.7, 0.6), (0.9, 0.2)]):
        rows.append({"path": f"s1/{i}", "study_uid": "T", "series_uid": "A", "series_description": "HEAD",
                     "index": i, **{k: 0.01 for k in LABELS}, "subdural": p_sdh, "any": p_any})
    rows.append({"path": "s2/0", "study_uid": "T", "series_uid": "B", "series_description": "",
                 "index": 0, **{k: 0.02 for k in LABELS}})
    slices = pd.DataFrame(rows)
    table = series_table(slices, threshold=0.5).set_index("series_uid")
    assert table.loc["A", "n_slices"] == 3 and table.loc["B", "n_slices"] == 1
    assert table.loc["A", "max_any"] == 0.9 and table.loc["A", "at_any"] == "s1/2"
    assert table.loc["A", "max_subdural"] == 0.6 and table.loc["A", "at_subdural"] == "s1/1"
    assert table.loc["A", "n_over_threshold"] == 2 and table.loc["A", "flag"] == "positive"
    assert table.loc["B", "n_over_threshold"] == 0 and table.loc["B", "flag"] == "negative"
    assert top_slices(slices, table.reset_index(), per_series=2)["path"].tolist() == ["s1/2", "s1/1"]
    with pytest.raises(ValueError, match="threshold"):
        series_table(slices, threshold=1.0)


@pytest.mark.slow
def test_a_folder_without_ct_slices_and_a_missing_checkpoint_are_clear_errors(trained, tmp_path, capsys):
    # both fail before any prediction: the command line in this process (kernel_runs.cli)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("no images here\n")
    assert cli("--predict", tmp_path / "docs", "--checkpoint", trained, "--out-dir", tmp_path / "o",
               "--workers", "0") == 2
    assert "no CT slice to predict" in capsys.readouterr().err
    assert (tmp_path / "o" / "skipped.csv").is_file() and not (tmp_path / "o" / "slices.csv").exists()
    with pytest.raises(SystemExit) as alone:
        cli("--predict", tmp_path / "docs")
    assert alone.value.code == 2 and "--predict needs --checkpoint" in capsys.readouterr().err
