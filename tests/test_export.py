"""The Kaggle export: generated from the sources, and it runs to the same submission."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from utils.demo import make_demo_dataset
from utils.export import STAGE_MARKER, build_bundle, build_notebook, export_kaggle, kernel_metadata

ROOT = Path(__file__).resolve().parents[1]
# the leaderboard recipe (every fold, the refiner on all of the out-of-fold predictions)
# with slice context, so that they are shown to work through the export too
ARGS = ["--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--workers", "0",
        "--weights", "none", "--seed", "3", "--context", "1", "--refine", "--folds", "2", "--fold", "all"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    files = export_kaggle(base / "kaggle", "someone/rsna-hemorrhage", "someone/wsl-weights")
    data = make_demo_dataset(base / "data", n_train_patients=6, n_test_patients=2, seed=1)
    return base, files, data


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERNEL_ARGS")}
    return env


def test_files_and_metadata(export):
    base, files, _ = export
    assert sorted(p.name for p in files) == ["kernel-metadata.json", "kernel.ipynb", "kernel_bundle.py"]
    meta = json.loads((base / "kaggle" / "kernel-metadata.json").read_text())
    assert meta["id"] == "someone/rsna-hemorrhage" and meta["code_file"] == "kernel.ipynb"
    assert meta["kernel_type"] == "notebook" and meta["language"] == "python"
    assert meta["enable_gpu"] is True and meta["enable_internet"] is False
    assert meta["competition_sources"] == ["rsna-intracranial-hemorrhage-detection"]
    assert meta["dataset_sources"] == ["someone/wsl-weights"] and meta["title"]
    with pytest.raises(ValueError, match="user/slug"):
        kernel_metadata("no-slash", [])


def test_notebook_is_valid_nbformat_4_with_a_cell_per_stage(export):
    base, _, _ = export
    nb = nbformat.read(base / "kaggle" / "kernel.ipynb", as_version=4)
    nbformat.validate(nb)
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    for stage in ("Stage 1: labels", "Stage 2: DICOM headers", "Stage 3: validation split",
                  "Stage 4: training", "Stage 5: validation", "Stage 6: refine", "Stage 7: predict",
                  "The whole run", "The fold loop", "Run:"):
        assert any(stage in m for m in markdown), stage
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    first_pipeline = next(i for i, c in enumerate(code) if "class Config" in c)
    inlined = [i for i, c in enumerate(code) if c.startswith('_module("utils.')]
    assert len(inlined) >= 8 and max(inlined) < first_pipeline  # helpers before the pipeline


# what main() imports when chosen, and what only they use: the repository's tools
REPOSITORY_ONLY = {"export", "own_scans", "scans", "series_results", "gradcam", "dataset", "evaluation", "own_labels"}


def test_export_is_generated_from_the_sources():
    bundle = build_bundle(ROOT)
    modules = sorted((ROOT / "utils").glob("*.py"))
    for module in modules:  # verbatim: it cannot drift
        assert (module.read_text() in bundle) == (module.stem not in REPOSITORY_ONLY), module.name
    kernel_body = (ROOT / "kernel.py").read_text().split("def load_labels", 1)[1].split("\n\n\n")[0]
    assert kernel_body in bundle


def _statements(source: str) -> list[str]:
    return [ast.dump(node) for node in ast.parse(source).body]


def test_every_statement_of_kernel_py_is_in_the_notebook_once_in_order():
    # Stages are cut at "# %% " markers; a statement outside any stage, or a marker the
    # export did not read, would be lost from the notebook or land twice.
    tree = ast.parse((ROOT / "kernel.py").read_text())
    body = [ast.dump(n) for n in tree.body[1:-1]  # without the docstring and __main__ block
            if not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    nb = build_notebook(ROOT)
    code = [("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]
    first = next(i for i, c in enumerate(code) if not c.startswith(("_module(", "import sys\nimport types")))
    assert "check_environment()" in code[0] and first > 1  # the first cell checks the packages
    pipeline = [s for c in code[first:-1] for s in _statements(c)]  # the last cell runs it
    assert pipeline == body
    titles = [line[len(STAGE_MARKER):].strip() for line in (ROOT / "kernel.py").read_text().splitlines()
              if line.startswith(STAGE_MARKER)]
    headings = [c["source"][0][3:].strip() for c in nb["cells"]
                if c["cell_type"] == "markdown" and c["source"][0].startswith("## ")]
    assert len(titles) >= 9 and headings[2:-1] == ["Imports", *titles]  # after "Helpers", before "Run"


def test_export_is_the_same_from_any_process():
    # Another process with another hash seed: set and dict orders that leak into the
    # notebook would differ there.
    code = "import json; from utils.export import build_notebook; print(json.dumps(build_notebook()))"
    env = dict(_clean_env(), PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT))
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=120)
    assert other.returncode == 0, other.stderr[-2000:]
    assert other.stdout.strip() == json.dumps(build_notebook(ROOT))


@pytest.mark.slow
def test_bundle_and_notebook_give_kernel_py_s_submission(export, tmp_path, monkeypatch):
    base, _, data = export
    ref = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--data-dir", str(data),
                          "--out-dir", str(tmp_path / "ref"), *ARGS], capture_output=True, text=True,
                         cwd=ROOT, env=_clean_env(), timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "Refiner: validation weighted log loss" in ref.stdout and "Out-of-fold weighted log loss" in ref.stdout
    assert (tmp_path / "ref" / "fold_1" / "checkpoints" / "best.pt").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    bundle = base / "kaggle" / "kernel_bundle.py"
    lone = empty / "kernel_bundle.py"  # alone in a folder: no utils/ anywhere near it
    lone.write_text(bundle.read_text())
    run = subprocess.run([sys.executable, str(lone), "--data-dir", str(data), "--out-dir",
                          str(tmp_path / "bundle"), *ARGS], capture_output=True, text=True,
                         cwd=empty, env=_clean_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = (tmp_path / "ref" / "submission.csv").read_text()
    assert (tmp_path / "bundle" / "submission.csv").read_text() == expected

    # the notebook in a real Jupyter kernel (ipykernel, started by nbclient), as Kaggle runs it
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("KERNEL_ARGS", " ".join(["--data-dir", str(data), "--out-dir", str(tmp_path / "nb"), *ARGS]))
    notebook = nbformat.read(base / "kaggle" / "kernel.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(empty)}}).execute()
    assert (tmp_path / "nb" / "submission.csv").read_text() == expected
    first = "".join(out.get("text", "") for out in notebook.cells[2].outputs)
    assert first.startswith("Python 3.") and "pydicom 3." in first  # the environment check ran
    assert not (empty / "utils").exists()


@pytest.mark.slow
def test_export_command(tmp_path, capsys):
    result = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--export-kaggle", str(tmp_path / "k"),
                             "--kaggle-id", "me/my-kernel"], capture_output=True, text=True, cwd=ROOT,
                            env=_clean_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kaggle kernels push -p" in result.stdout
    assert json.loads((tmp_path / "k" / "kernel-metadata.json").read_text())["id"] == "me/my-kernel"
    import kernel  # a refused id fails at once: the command line in this process
    assert kernel.cli(["--export-kaggle", str(tmp_path / "k2"), "--kaggle-id", "Bad Id"]) == 2
    assert "user/slug" in capsys.readouterr().err


@pytest.mark.slow
def test_notebook_with_two_processes_runs_under_torchrun_like_kernel_py(export, tmp_path, monkeypatch):
    # Kaggle's 2 x T4: one process per GPU. On the CPU, --processes 2 asks for the same
    # launch (gloo); the notebook, which has no file, hands torchrun the cells it ran.
    base, _, data = export
    args = ["--data-dir", str(data), "--arch", "resnet18", "--image-size", "32", "--epochs", "1",
            "--workers", "0", "--weights", "none", "--seed", "3", "--processes", "2"]
    env = dict(_clean_env(), OMP_NUM_THREADS="1")
    ref = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--out-dir", str(tmp_path / "ref"), *args],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    assert "Starting 2 processes under torchrun" in ref.stdout
    assert json.loads((tmp_path / "ref" / "metrics.json").read_text())["processes"] == 2

    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("KERNEL_ARGS", " ".join(["--out-dir", str(tmp_path / "nb"), *args]))
    empty = tmp_path / "empty"
    empty.mkdir()
    notebook = nbformat.read(base / "kaggle" / "kernel.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(empty)}}).execute()
    shown = "".join(out.get("text", "") for out in notebook.cells[-1].outputs)
    assert "Starting 2 processes under torchrun" in shown and "Validation weighted log loss" in shown
    assert json.loads((tmp_path / "nb" / "config.json").read_text())["processes"] == 2
    assert (tmp_path / "nb" / "submission.csv").read_text() == (tmp_path / "ref" / "submission.csv").read_text()
