"""Shared fixtures: where the real RSNA sample lives, skipping cleanly when it is absent;
one finished tiny demo run for the whole session."""
from pathlib import Path

import pytest

SAMPLE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna_sample"


@pytest.fixture
def rsna_sample() -> Path:
    if not (SAMPLE_DIR / "stage_2_train.csv").is_file():
        pytest.skip(f"real RSNA sample not found at {SAMPLE_DIR}")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished ``kernel.py *TINY`` run, shared by every test module that needs one.
    Read it only: a test that changes the run works on a copy (tiny_run_copy)."""
    from kernel_runs import TINY, run_kernel
    out = tmp_path_factory.mktemp("run") / "out"
    result = run_kernel("--out-dir", out, *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run's folder, for a test that resumes, overwrites or
    damages it."""
    import shutil
    return shutil.copytree(tiny_run[0], tmp_path / "run")
