"""utils.inference: what a prediction takes from the run that trained the model."""
import dataclasses

import pandas as pd
import pytest

from utils.engine import Checkpoints, Dist
from utils.errors import UserError
from utils.inference import PREDICTION_SETTINGS, input_layout, load_model, slice_dataset, trained_settings
from utils.runtime import setup_runtime


@dataclasses.dataclass
class Settings:  # kernel.Config's fields that matter here
    arch: str = "resnext101_32x8d"
    image_size: int = 256
    windows: str = "brain,subdural,soft_tissue"
    context: int = 0
    context_windows: bool = False
    crop: str = "none"
    batch_size: int = 32
    tta: bool = True
    workers: int = 4
    seed: int = 0


def test_a_prediction_takes_the_trained_settings_and_keeps_its_own_machine_settings():
    trained = {"arch": "resnet18", "image_size": 64, "context": 1, "tta": False, "workers": 0, "lr": 1.0}
    got = trained_settings(Settings(batch_size=8), trained)
    assert (got.arch, got.image_size, got.context, got.tta) == ("resnet18", 64, 1, False)
    assert got.batch_size == 32  # absent from the old config: the default, as it was trained
    assert got.workers == 4  # how this machine loads data is not the model's
    assert set(Checkpoints.SHAPING) > set(PREDICTION_SETTINGS) - {"tta"}


def test_a_model_trained_on_cropped_heads_predicts_on_cropped_heads():
    got = trained_settings(Settings(), {"crop": "head"})
    assert got.crop == "head" and trained_settings(Settings(crop="head"), {}).crop == "none"  # older runs: none
    rows = pd.DataFrame({"path": ["a.dcm"], "below": ["a.dcm"], "above": ["a.dcm"]})
    assert slice_dataset(rows, got).crop == "head"


@pytest.mark.parametrize("context, context_windows, windows, expected", [
    (0, False, "brain,subdural,soft_tissue", (3, 1)), (0, False, "brain", (1, 1)),
    (1, False, "brain,subdural,soft_tissue", (3, 1)), (1, True, "brain,subdural,soft_tissue", (9, 3))])
def test_input_layout(context, context_windows, windows, expected):
    assert input_layout(Settings(context=context, context_windows=context_windows, windows=windows)) == expected


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(UserError, match=f"{path}: not a checkpoint of this pipeline"):
        load_model(path, setup_runtime(Dist()))
