"""utils.series_results: series.csv's sources columns, and predict.html read as a browser's parser
reads it: the summary table in triage order, each row a link to its own series' section."""
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from utils.labels import LABELS
from utils.series_results import series_table, write_predict_html

SCRIPT = "<script>alert('x')</script>"
ENHANCED = "Enhanced CT (Explicit VR Little Endian)"
JPEG, EXPLICIT = "DICOM (JPEG Lossless SV1)", "DICOM (Explicit VR Little Endian)"
NIFTI = "NIfTI-1 (gzip)"
# (study, series, description, [(file, format, any)] per slice); UIDs no other contains
SERIES = [
    ("1.2.826.0.1.1", "1.2.826.0.2.11", "HEAD", [("a/ct.dcm", ENHANCED, p) for p in (0.2, 0.7, 0.4)]),
    ("1.2.826.0.1.1", "1.2.826.0.2.22", SCRIPT, [("b/IM&1.dcm", JPEG, 0.95), ("b/IM&2.dcm", EXPLICIT, 0.1)]),
    ("1.2.826.0.1.3", "1.2.826.0.2.33", "", [("c/head.nii.gz", NIFTI, 0.3)]),
    ("1.2.826.0.1.0", "1.2.826.0.2.44", "AXIAL", [(f"d/{i}.dcm", JPEG, 0.3 if i == 3 else 0.1) for i in range(7)]),
]
# positive first (0.95, 0.7), then negative by max `any`; the tie at 0.3 goes by study UID
ORDER = ["1.2.826.0.2.22", "1.2.826.0.2.11", "1.2.826.0.2.44", "1.2.826.0.2.33"]
THRESHOLD = 0.5


def make_slices() -> pd.DataFrame:
    rows = []
    for study, series, description, slices in SERIES:
        for index, (file, format_, p_any) in enumerate(slices):
            rows.append({"path": f"{file}#{index}", "file": file, "format": format_, "study_uid": study,
                         "series_uid": series, "series_description": description, "index": index,
                         **{k: p_any / 2 for k in LABELS}, "any": p_any})
    return pd.DataFrame(rows).sample(frac=1, random_state=0)  # the page must not rely on the input's order


class Page(HTMLParser):
    """What the tests read of predict.html: the summary table's headers and rows (cell texts,
    link targets), each section's id, text and heatmap captions (their texts between tags),
    every tag's name and every src and href."""

    def __init__(self, text: str):
        super().__init__()
        self.headers, self.rows, self.sections, self.tags, self.sources = [], [], [], [], []
        self._in_summary = self._in_caption = False
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.sources += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag == "table" and attrs.get("class") == "summary":
            self._in_summary = True
        elif tag == "tr" and self._in_summary:
            self.rows.append({"cells": [], "hrefs": []})
        elif tag in ("td", "th") and self._in_summary:
            self._cell = []
        elif tag == "a" and self._in_summary:
            self.rows[-1]["hrefs"].append(attrs["href"])
        elif tag == "section":
            self.sections.append({"id": attrs.get("id"), "text": [], "heatmaps": 0, "captions": []})
        elif tag == "img" and attrs.get("alt") == "heatmap":
            self.sections[-1]["heatmaps"] += 1
        elif tag == "figcaption":
            self._in_caption = True
            self.sections[-1]["captions"].append([])

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_summary = False
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[-1]["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self.sections:
            self.sections[-1]["text"].append(data)
            if self._in_caption:
                self.sections[-1]["captions"][-1].append(data)

    def table(self) -> list[dict]:
        """The summary's body rows as {header: cell text}, plus their link targets."""
        header, *body = self.rows
        return [{**dict(zip(header["cells"], row["cells"], strict=True)), "hrefs": row["hrefs"]} for row in body]

    def section_text(self, section: dict) -> str:
        return "".join(section["text"])


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    slices = make_slices()
    out = write_predict_html(tmp_path_factory.mktemp("predict") / "predict.html", slices,
                             series_table(slices, THRESHOLD), {}, threshold=THRESHOLD, notes=["a note"])
    return Page(out.read_text(encoding="utf-8"))


def test_series_table_counts_the_files_and_lists_the_formats_of_each_series():
    table = series_table(make_slices(), THRESHOLD)
    assert list(table.columns[:6]) == ["study_uid", "series_uid", "series_description", "n_slices", "format", "files"]
    table = table.set_index("series_uid")
    assert table.loc["1.2.826.0.2.11", "format"] == ENHANCED and table.loc["1.2.826.0.2.11", "files"] == 1
    assert table.loc["1.2.826.0.2.22", "format"] == f"{EXPLICIT}; {JPEG}" and table.loc["1.2.826.0.2.22", "files"] == 2
    assert table.loc["1.2.826.0.2.33", "format"] == NIFTI and table.loc["1.2.826.0.2.33", "files"] == 1
    assert table.loc["1.2.826.0.2.44", "format"] == JPEG and table.loc["1.2.826.0.2.44", "files"] == 7
    assert table.loc["1.2.826.0.2.11", "n_slices"] == 3  # three frames of one file


def test_series_table_without_file_and_format_counts_paths_and_leaves_format_empty():
    slices = make_slices()
    full = series_table(slices, THRESHOLD)
    older = series_table(slices.drop(columns=["file", "format"]), THRESHOLD)
    assert list(older.columns) == list(full.columns)
    assert (older["format"] == "").all()
    paths = slices.groupby(["study_uid", "series_uid"])["path"].nunique()
    assert older.set_index(["study_uid", "series_uid"])["files"].to_dict() == paths.to_dict()
    same = [c for c in full.columns if c not in ("format", "files")]
    pd.testing.assert_frame_equal(older[same], full[same])


def test_the_summary_lists_every_series_positive_first_then_by_max_any(page):
    table = page.table()
    expected = series_table(make_slices(), THRESHOLD).set_index("series_uid").loc[ORDER]
    assert [row["study UID"] for row in table] == list(expected["study_uid"])
    assert [row["series description"] for row in table] == [d or "(no description)" for d in
                                                           expected["series_description"]]
    assert [row["flag"] for row in table] == ["positive", "positive", "negative", "negative"]
    assert [float(row["max any"]) for row in table] == pytest.approx([0.95, 0.7, 0.3, 0.3], abs=1e-3)
    assert [row["format"] for row in table] == list(expected["format"])
    assert [int(row["slices"]) for row in table] == list(expected["n_slices"])
    for label in LABELS:
        assert [float(row[f"max {label}"]) for row in table] == pytest.approx(expected[f"max_{label}"], abs=1e-3)


def test_each_row_links_to_its_own_series_section_in_the_same_order(page):
    table, sections = page.table(), page.sections
    ids = [s["id"] for s in sections]
    assert len(sections) == len(SERIES) and len(set(ids)) == len(ids)
    linked = 0
    for position, (row, uid) in enumerate(zip(table, ORDER, strict=True)):
        assert len(set(row["hrefs"])) == 1 and row["hrefs"][0].startswith("#")
        target = ids.index(row["hrefs"][0][1:])
        assert target == position  # the sections come in the table's order
        text = page.section_text(sections[target])
        assert uid in text and not any(other in text for other in ORDER if other != uid)
        study, _, description, files = next(s for s in SERIES if s[1] == uid)
        assert study in text and description in text
        names = sorted({f for f, _, _ in files})
        assert all(name in text for name in names[:5]) and not any(name in text for name in names[5:])
        assert all(fmt in text for fmt in {f for _, f, _ in files})
        linked += 1
    assert linked == len(SERIES)


def test_descriptions_and_file_names_are_escaped_and_the_page_stays_offline(page):
    assert "script" not in page.tags
    assert SCRIPT in [row["series description"] for row in page.table()]
    assert SCRIPT in page.section_text(page.sections[0]) and "b/IM&1.dcm" in page.section_text(page.sections[0])
    assert all(src.startswith(("data:image/png;base64,", "#")) for src in page.sources)
    assert "link" not in page.tags


def test_heatmaps_land_in_their_own_series_section(tmp_path):
    slices = make_slices()
    slices = slices[slices["series_uid"].isin(ORDER[:2])]  # the positive two: each plot costs ~0.2 s
    heat = np.zeros((8, 8, 3), dtype=np.uint8)
    chosen = {"a/ct.dcm#1": ("subdural", heat), "a/ct.dcm#2": ("any", heat), "b/IM&1.dcm#0": ("epidural", heat)}
    out = write_predict_html(tmp_path / "predict.html", slices, series_table(slices, THRESHOLD), chosen,
                             threshold=THRESHOLD, notes=[])
    sections = Page(out.read_text(encoding="utf-8")).sections
    assert [s["heatmaps"] for s in sections] == [1, 2]  # in ORDER: 22, 11
    assert [c[0] for c in sections[0]["captions"]] == ["b/IM&1.dcm#0"]  # a caption's first line: the slice
    assert sorted(c[0] for c in sections[1]["captions"]) == ["a/ct.dcm#1", "a/ct.dcm#2"]
