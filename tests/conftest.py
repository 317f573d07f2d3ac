"""Shared fixtures: where the real RSNA sample lives, skipping cleanly when it is absent."""
from pathlib import Path

import pytest

SAMPLE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna_sample"


@pytest.fixture
def rsna_sample() -> Path:
    if not (SAMPLE_DIR / "stage_2_train.csv").is_file():
        pytest.skip(f"real RSNA sample not found at {SAMPLE_DIR}")
    return SAMPLE_DIR
