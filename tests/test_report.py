"""utils.report and utils.figures: every figure is a real picture, the survey counts right, the page stands alone."""
import base64
import json
import re
import warnings

import cv2
import numpy as np
import pandas as pd
import pytest

from factories import screenshot
from utils.demo import make_demo_dataset
from utils.dicom import BRAIN, EXPLICIT_LE, HEADER, IMPLICIT_LE
from utils.headers import scan_headers
from utils.labels import LABELS, SUBTYPES, read_labels
from utils.figures import (EXAMPLE_ROWS, NORMAL, example_candidates, header_survey, pick_examples, window_title,
                           write_examples, write_header_survey, write_label_figure, write_training_figure)
from utils.report import write_html, write_report

WINDOWS = "brain,subdural,soft_tissue"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_train_patients=6, n_test_patients=2)
    labels = read_labels(root / "stage_2_train.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: the RSNA IDs are not valid UIDs
        headers, bad = scan_headers(sorted((root / "stage_2_train").glob("*.dcm")))
    assert len(bad) == 1  # the demo's truncated file
    paths = pd.Series(headers["path"].to_numpy(), index=headers["image_id"].to_numpy())
    return labels, headers, paths


def assert_picture(path, min_width=400, min_height=250):
    """A PNG that decodes, is at least this large, and is not one flat colour."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imread(str(path))
    assert img is not None, f"{path} does not decode"
    height, width = img.shape[:2]
    assert width >= min_width and height >= min_height, (width, height)
    assert img.std() > 5
    colours = img.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)  # one int per BGR colour
    assert len(np.unique(colours)) > 20
    return img


def make_history(epochs=4, per_class=True):
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_loss": 0.4 / e, "val_loss": 0.3 / e + 0.01 * e, "lr": 1e-3 / e, "seconds": 5.0}
        if per_class:
            row.update({f"val_loss_{k}": 0.2 / e + 0.01 * i for i, k in enumerate(LABELS)})
            row.update({f"val_auc_{k}": 0.6 + 0.05 * e for k in LABELS})
        rows.append(row)
    return pd.DataFrame(rows)


METRICS = {"validated_on": "validation", "weighted_log_loss": 0.0912345, "prior_weighted_log_loss": 0.287654,
           "log_loss_per_class": {k: 0.05 + 0.01 * i for i, k in enumerate(LABELS)},
           "prior_log_loss_per_class": {k: 0.2 for k in LABELS},
           "n_train": 57, "n_validation": 14, "n_test": 19, "best_epoch": 3, "seconds": 42.5}
CONFIG = {"arch": "resnet18", "image_size": 128, "windows": WINDOWS, "epochs": 4}


@pytest.fixture(scope="module")
def full_report(demo, tmp_path_factory):
    labels, headers, _ = demo
    out = tmp_path_factory.mktemp("run")
    (out / "config.json").write_text(json.dumps(CONFIG))
    (out / "metrics.json").write_text(json.dumps(METRICS))
    make_history().to_csv(out / "history.csv", index=False)
    return out, write_report(out, labels, headers)


# --------------------------------------------------------------------------- labels.png
def test_label_figure(demo, tmp_path):
    labels, _, _ = demo
    path = write_label_figure(labels, tmp_path / "labels.png")
    assert path == tmp_path / "labels.png"
    assert_picture(path, 900, 300)


def test_label_figure_rejects_a_table_without_the_six_columns(demo, tmp_path):
    labels, _, _ = demo
    with pytest.raises(ValueError, match="label columns"):
        write_label_figure(labels.drop(columns="any"), tmp_path / "labels.png")
    assert not (tmp_path / "labels.png").exists()


# ------------------------------------------------------------------------ header survey
def header_row(**changes):
    row = dict(path="x.dcm", image_id="ID_000000000", patient_id="ID_p", study_uid="ID_s", series_uid="ID_r",
               z=0.0, rows=512, columns=512, samples_per_pixel=1, photometric="MONOCHROME2",
               bits_allocated=16, bits_stored=12, pixel_representation=0, rescale_intercept=-1024.0,
               rescale_slope=1.0, window_center=40.0, window_width=80.0, multi_window=True,
               pixel_spacing=0.48828125, transfer_syntax=EXPLICIT_LE)
    row.update(changes)
    return row


def known_headers():
    nan = float("nan")
    return pd.DataFrame([
        header_row(),
        header_row(),
        header_row(bits_stored=16, pixel_representation=1, multi_window=False, pixel_spacing=0.4882,
                   transfer_syntax=IMPLICIT_LE),
        header_row(rescale_intercept=0.0),  # the 12-bit wrap
        header_row(rows=630, columns=512, window_center=nan, window_width=nan, multi_window=False,
                   pixel_spacing=nan, rescale_intercept=-1000.0),
    ])


def test_header_survey_counts_a_known_table():
    survey = header_survey(known_headers())
    assert list(survey.columns) == ["attribute", "value", "count"]
    got = {a: list(zip(block["value"], block["count"])) for a, block in survey.groupby("attribute", sort=False)}
    assert got == {
        "image_size": [("512x512", 4), ("630x512", 1)],
        "bits_stored/pixel_representation": [("12 bits, unsigned", 4), ("16 bits, signed", 1)],
        "rescale_intercept": [("-1024", 3), ("-1000", 1), ("0", 1)],
        "rescale_slope": [("1", 5)],
        "12bit_wrap": [("no", 4), ("yes", 1)],
        "windows": [("multi-valued", 3), ("absent", 1), ("single", 1)],
        # 0.48828125 and 0.4882 are one value at the survey's 3 decimals
        "pixel_spacing_mm": [("0.488", 4), ("absent", 1)],
        "photometric": [("MONOCHROME2", 5)],
        "transfer_syntax": [("explicit VR little endian", 4), ("implicit VR little endian", 1)],
    }


def test_header_survey_rejects_a_table_without_its_columns():
    with pytest.raises(ValueError, match="rescale_intercept"):
        header_survey(known_headers().drop(columns="rescale_intercept"))


def test_header_survey_files(demo, tmp_path):
    _, headers, _ = demo
    survey = write_header_survey(headers, tmp_path / "h.csv", tmp_path / "h.png")
    back = pd.read_csv(tmp_path / "h.csv", dtype={"value": str})
    assert back["attribute"].tolist() == survey["attribute"].tolist()
    assert back["count"].tolist() == survey["count"].tolist()
    assert (back.groupby("attribute")["count"].sum() == len(headers)).all()
    # the demo writes all three header variants of the real data
    wraps = dict(zip(*survey[survey["attribute"] == "12bit_wrap"][["value", "count"]].T.to_numpy()))
    assert wraps["yes"] > 0 and wraps["no"] > 0
    assert_picture(tmp_path / "h.png", 1000, 300)


def test_header_survey_folds_rare_values_into_other(tmp_path):
    headers = pd.DataFrame([header_row(pixel_spacing=0.4 + 0.01 * i) for i in range(15)])
    survey = write_header_survey(headers, tmp_path / "h.csv", tmp_path / "h.png")
    assert (survey["attribute"] == "pixel_spacing_mm").sum() == 15  # the CSV keeps every value
    assert_picture(tmp_path / "h.png", 1000, 300)


# ---------------------------------------------------------------------------- examples
def test_window_titles():
    assert window_title(BRAIN) == "brain 40/80"
    assert window_title((55, 150)) == "55/150"
    assert window_title(HEADER) == "header window"


def test_pick_examples_takes_positives_of_each_row(demo):
    labels, _, paths = demo
    picked = pick_examples(labels, paths, WINDOWS, per_class=3, size=64, seed=0)
    assert list(picked) == list(EXAMPLE_ROWS)
    for row, examples in picked.items():
        assert len(examples) == 3
        for image_id, img in examples:
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
            if row == NORMAL:
                assert labels.loc[image_id, "any"] == 0
            else:
                assert labels.loc[image_id, row] == 1
    again = pick_examples(labels, paths, WINDOWS, per_class=3, size=64, seed=0)
    assert [[i for i, _ in again[r]] for r in EXAMPLE_ROWS] == [[i for i, _ in picked[r]] for r in EXAMPLE_ROWS]


def test_example_candidates_prefer_a_subtype_alone(demo):
    labels, _, paths = demo
    candidates = example_candidates(labels, paths.index, seed=1)
    n_subtypes = labels[list(SUBTYPES)].sum(axis=1)
    for subtype in SUBTYPES:
        alone = int(((labels[subtype] == 1) & (n_subtypes == 1) & labels.index.isin(paths.index)).sum())
        order = n_subtypes.loc[candidates[subtype]].to_numpy()
        assert (order[:alone] == 1).all() and (order[alone:] != 1).all()
    assert set(candidates[NORMAL]) == set(labels.index[(labels["any"] == 0) & labels.index.isin(paths.index)])


def test_pick_examples_skips_unreadable_slices_and_empty_classes(demo, tmp_path):
    labels, _, paths = demo
    labels = labels.copy()
    labels["epidural"] = 0
    first = example_candidates(labels, paths.index, seed=0)["subdural"][0]
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file")
    paths = paths.copy()
    paths[first] = str(junk)
    picked = pick_examples(labels, paths, WINDOWS, per_class=2, size=32, seed=0)
    assert picked["epidural"] == []
    assert first not in [i for i, _ in picked["subdural"]] and len(picked["subdural"]) == 2


def test_examples_figure_with_a_class_without_positives(demo, tmp_path):
    labels, _, paths = demo
    labels = labels.copy()
    labels["epidural"] = 0
    path = write_examples(labels, paths.to_dict(), WINDOWS, tmp_path / "examples.png", per_class=2, size=64)
    img = assert_picture(path, 800, 800)
    assert (img < 30).all(axis=2).mean() > 0.05  # the slices' black background is drawn


# ------------------------------------------------------------------------ training.png
def test_training_figure(tmp_path):
    assert_picture(write_training_figure(make_history(), tmp_path / "t.png", prior_loss=0.29), 900, 500)


def test_training_figure_with_one_epoch_and_only_the_losses(tmp_path):
    history = make_history(epochs=1, per_class=False).drop(columns="lr")
    assert_picture(write_training_figure(history, tmp_path / "t.png"), 900, 500)


def test_training_figure_rejects_malformed_history(tmp_path):
    with pytest.raises(ValueError, match="val_loss"):
        write_training_figure(make_history().drop(columns="val_loss"), tmp_path / "t.png")
    with pytest.raises(ValueError, match="no epochs"):
        write_training_figure(make_history().iloc[:0], tmp_path / "t.png")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------ the whole report
def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_writes_every_file(full_report):
    out, written = full_report
    report = out / "report"
    names = ["training.png", "labels.png", "examples.png", "dicom_headers.csv", "dicom_headers.png",
             "report.html"]
    assert written == [report / n for n in names]
    for path in written:
        if path.suffix == ".png":
            assert_picture(path)
    assert sorted(p.name for p in report.iterdir()) == sorted(names)  # no temporary files left


def test_html_embeds_every_figure_and_the_metrics(full_report):
    out, _ = full_report
    page = (out / "report" / "report.html").read_text()
    figures = [(out / "report" / n).read_bytes()
               for n in ("training.png", "labels.png", "examples.png", "dicom_headers.png")]
    assert embedded_pngs(page) == figures
    for value in ("0.09123", "0.28765", "resnet18", WINDOWS, ">57<", ">42.5<"):
        assert value in page
    assert page.count("<tr><td>subdural</td>") == 1  # the per-class metrics table
    assert "12bit_wrap" in page  # the survey's full table
    # nothing a browser would fetch: one file that opens offline
    assert not re.search(r"<script|<link|@import|url\(|https?://", page)


@pytest.mark.parametrize("validated_on, words", [("validation", "Validation"), ("out_of_fold", "Out-of-fold"),
                                                  ("shared_validation", "Blend's validation")])
def test_every_kind_of_run_gets_a_headline(tmp_path, validated_on, words):
    # one metrics schema: a single run, a --fold all run and an ensemble name their final
    # loss alike (a fold run's report had no headline when its key differed)
    metrics = {"validated_on": validated_on, "weighted_log_loss": 0.0812345, "prior_weighted_log_loss": 0.1}
    page = write_html(tmp_path / "r.html", {}, metrics=metrics).read_text()
    assert f'<p class="headline">{words} weighted log loss <b>0.08123</b> against 0.10000 for the constant ' \
           f'prior (18.8% lower)</p>' in page


def test_report_before_training(demo, tmp_path):
    labels, headers, _ = demo
    written = write_report(tmp_path, labels, headers.set_index("image_id"), per_class=1)  # as kernel.py keeps them
    names = [p.name for p in written]
    assert "training.png" not in names and names[-1] == "report.html"
    assert "examples.png" in names  # the image paths come from the headers
    page = (tmp_path / "report" / "report.html").read_text()
    assert "no history.csv" in page and "No metrics.json" in page and "No config.json" in page
    assert len(embedded_pngs(page)) == 3


def test_report_with_no_inputs(tmp_path):
    written = write_report(tmp_path)
    assert written == [tmp_path / "report" / "report.html"]
    page = written[0].read_text()
    assert "no label table" in page and "no header scan" in page and not embedded_pngs(page)


def test_report_rejects_malformed_json(tmp_path):
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="metrics.json"):
        write_report(tmp_path)


@pytest.mark.slow
def test_html_renders_in_chromium(full_report, tmp_path):
    out, _ = full_report
    shot = screenshot(out / "report" / "report.html", tmp_path / "shot.png", tmp_path / "profile")
    img = assert_picture(shot, 1200, 3000)
    # Broken images would leave a page of text on white: the CT slices' black must show.
    assert (img < 30).all(axis=2).mean() > 0.02
