"""benchmarks/gpu_check.sh, the prepared GPU check: its --cpu-smoke runs every step at toy
size on the CPU, so that the script is known to work before a GPU session spends on it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_smoke_runs_every_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TMPDIR=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.log").read_text().count("=== ") >= 2 * len(report["steps"])
    assert report["mode"] == "cpu-smoke" and report["all_ok"] is True
    # what a user runs first, throughput after, compilation last
    assert [s["name"] for s in report["steps"]] == ["versions", "data", "bf16_interrupted", "bf16_resumed",
                                                    "predict_only", "fp16", "two_processes", "all_reduce",
                                                    "bench", "bench_compiled"]
    assert all(s["ok"] and s["seconds"] > 0 for s in report["steps"]), report["steps"]
    assert report["versions"]["python"] and report["versions"]["pydicom"]
    for run in ("eager", "compiled"):
        figures = report["training"][run]
        for key in ("images_s_alone", "images_s_fed", "fed_over_alone", "loader_images_s_alone"):
            assert isinstance(figures[key], float) and figures[key] > 0, (run, key, figures)
        assert figures["met"] is None  # the targets are the H200's, not a CPU's
    assert report["target"] == {"images_s_fed": 600, "fed_over_alone": 0.9, "met": None}
    for precision in ("bf16", "fp16"):  # kernel.py's own loop, beside the benchmark's
        assert report["kernel_loop"][precision]["train_images_s"] > 0
        assert report["kernel_loop"][precision]["skipped_steps"] >= 0
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


@pytest.mark.slow
def test_it_stops_at_once_when_a_package_cannot_be_imported(tmp_path):
    # the GPU machine without the carried wheels: every later step would fail on it
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "pydicom.py").write_text("raise ModuleNotFoundError(\"No module named 'pydicom'\")\n")
    env = dict(os.environ, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), PYTHONPATH=str(blocker),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1
    stops = [line for line in result.stdout.splitlines() if line.startswith("gpu_check: stopped")]
    assert len(stops) == 1 and "cannot import pydicom (ModuleNotFoundError" in stops[0]
    assert "=== " not in result.stdout and not (tmp_path / "out" / "gpu_check.json").exists()
