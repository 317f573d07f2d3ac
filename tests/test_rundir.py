"""utils.rundir: a run folder in use belongs to one process, until that process ends."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from utils.rundir import FolderInUse, exclusive

ROOT = Path(__file__).resolve().parents[1]


def test_a_held_folder_is_refused_naming_its_holder_and_free_once_released(tmp_path):
    out = tmp_path / "run"
    with exclusive(out):
        assert out.is_dir()
        with pytest.raises(FolderInUse, match=f"in use by another run \\(process {os.getpid()}\\)"):
            with exclusive(out):
                pass
    with exclusive(out):  # released at the end of the block
        pass


def test_the_lock_of_a_killed_process_is_released_by_the_system(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from utils.rundir import exclusive\n"
            "with exclusive(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=f"process {holder.pid}\\)"):
            with exclusive(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive(out):  # no stale lock to clear by hand
        pass


@pytest.mark.parametrize("mode", [[], ["--predict", "SCANS", "--checkpoint", "best.pt"]])
def test_kernel_refuses_a_folder_in_use_before_writing_anything(tmp_path, capsys, mode):
    from kernel_runs import TINY, cli
    out = tmp_path / "out"
    args = [a.replace("SCANS", str(tmp_path)) for a in mode]
    with exclusive(out):
        assert cli("--out-dir", out, *TINY, *args) == 2
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert f"is in use by another run (process {os.getpid()})" in capsys.readouterr().err


def _tiny_run(folder: Path, folds: int = 0) -> Path:
    """The files that say what a run folder is: a best.pt per model (no real weights)."""
    from utils import rundir
    models = [rundir.fold_dir(folder, i) for i in range(folds)] if folds else [folder]
    for model in models:
        rundir.checkpoint(model).parent.mkdir(parents=True)
        rundir.checkpoint(model).write_bytes(b"not read here")
    return folder


def test_what_a_path_holds(tmp_path):
    from utils import rundir
    single, folds = _tiny_run(tmp_path / "single"), _tiny_run(tmp_path / "folds", folds=11)
    (folds / "fold_notes").mkdir()  # not a fold
    blend = tmp_path / "blend"
    blend.mkdir()
    rundir.write_json(blend / rundir.ENSEMBLE, {"runs": [str(folds), str(single)], "weights": None})
    assert rundir.kind(rundir.checkpoint(single)) == "checkpoint"
    assert [rundir.kind(p) for p in (single, folds, blend)] == ["run", "folds", "ensemble"]
    assert rundir.model_checkpoints(single) == [rundir.checkpoint(single)]
    assert rundir.model_checkpoints(folds) == [rundir.checkpoint(folds / f"fold_{i}") for i in range(11)]  # 10 after 9
    assert rundir.first_checkpoint(blend) == rundir.checkpoint(folds / "fold_0")
    with pytest.raises(rundir.UserError, match="holds no checkpoints/best.pt, fold_\\*/ or ensemble.json"):
        rundir.kind(tmp_path / "empty")


def test_validation_predictions_are_what_the_run_submitted(tmp_path):
    import pandas as pd

    from utils import rundir
    from utils.labels import LABELS
    table = pd.DataFrame({"image_id": ["ID_a", "ID_b"], **{k: [0, 1] for k in LABELS},
                          **{c: [0.2, 0.6] for c in rundir.PRED_COLUMNS}})
    table.to_csv(tmp_path / rundir.VAL_PREDICTIONS, index=False)
    assert rundir.validation_predictions(tmp_path)[rundir.PRED_COLUMNS].to_numpy().tolist() == [[0.2] * 6, [0.6] * 6]
    refined = table.assign(**{c: [0.1, 0.9] for c in rundir.REFINED_COLUMNS})
    refined.to_csv(tmp_path / rundir.OOF_PREDICTIONS, index=False)  # a fold run's, refiner used
    got = rundir.validation_predictions(tmp_path)
    assert list(got.columns) == [*LABELS, *rundir.PRED_COLUMNS]
    assert got[rundir.PRED_COLUMNS].to_numpy().tolist() == [[0.1] * 6, [0.9] * 6]


def test_bad_files_of_the_folds_are_merged_once(tmp_path):
    import pandas as pd

    from utils import rundir
    rows = {tmp_path: ["a", "b"], tmp_path / "fold_0": ["a", "c"], tmp_path / "fold_1": ["d"]}
    for folder, paths in rows.items():
        folder.mkdir(exist_ok=True)
        pd.DataFrame({"path": paths, "reason": "x"}).to_csv(folder / rundir.BAD_FILES, index=False)
    assert rundir.bad_paths(rundir.fold_dirs(tmp_path)) == {"a", "c", "d"}
    rundir.merge_bad_files(tmp_path)
    assert pd.read_csv(tmp_path / rundir.BAD_FILES)["path"].tolist() == ["a", "b", "c", "d"]


def test_a_finished_run_is_not_overwritten_and_a_resume_clears_unfinished_writes(tmp_path):
    import contextlib

    from utils import rundir
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.METRICS).write_text("{}")
    (out / "history.csv.1234.tmp").write_text("half")
    with contextlib.ExitStack() as held, pytest.raises(rundir.UserError, match="already holds a finished run"):
        rundir.prepare_out_dir(out, held, resume=False, overwrite=False)
    previous = _tiny_run(tmp_path / "input" / "session-1")
    rundir.checkpoint(previous, rundir.LAST).write_bytes(b"last")
    with contextlib.ExitStack() as held:
        assert rundir.prepare_out_dir(out, held, resume=True, overwrite=False, inputs=tmp_path / "input") == out
    assert not list(out.glob("*.tmp")) and rundir.checkpoint(out, rundir.LAST).read_bytes() == b"last"
