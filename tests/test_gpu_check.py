"""benchmarks/gpu_check.sh, the prepared GPU check: its --cpu-smoke runs every step at toy
size on the CPU, so that the script is known to work before a GPU session spends on it."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_runs_every_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TMPDIR=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.log").read_text().count("=== ") >= 2 * len(report["steps"])
    assert report["mode"] == "cpu-smoke" and report["all_ok"] is True
    assert [s["name"] for s in report["steps"]] == ["versions", "bench", "bench_compiled", "data",
                                                    "train_interrupted", "resume", "predict_only",
                                                    "torchrun", "all_reduce"]
    assert all(s["ok"] and s["seconds"] > 0 for s in report["steps"]), report["steps"]
    assert report["versions"]["python"] and report["versions"]["pydicom"]
    for run in ("eager", "compiled"):
        figures = report["training"][run]
        for key in ("images_s_alone", "images_s_fed", "fed_over_alone", "loader_images_s_alone"):
            assert isinstance(figures[key], float) and figures[key] > 0, (run, key, figures)
        assert figures["met"] is None  # the targets are the H200's, not a CPU's
    assert report["target"] == {"images_s_fed": 600, "fed_over_alone": 0.9, "met": None}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]  # its work folder is removed


def test_both_scripts_are_valid_bash():
    # gpu_wheels.sh downloads from PyPI: only its syntax is checked here
    for script in ("gpu_wheels.sh", "gpu_check.sh"):
        result = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_an_unknown_option_is_refused(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--gpu"],
                            capture_output=True, text=True, env=dict(os.environ, OUT=str(tmp_path)))
    assert result.returncode == 2 and "usage" in result.stderr
    assert not (tmp_path / "gpu_check.json").exists()
