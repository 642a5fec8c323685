"""The configuration and its command-line overrides."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from training.config import TrainingConfig
from training.model import PaperCNN
from training.overrides import apply_overrides


def test_default_cnn_has_the_paper_shape():
    model = PaperCNN()
    # three 16-filter 3x3 convolutions and a dense layer over 16 x 7 x 7 features
    assert sum(p.numel() for p in model.parameters()) == 12_650
    assert list(model.layers()) == ["conv1", "conv2", "conv3", "dense"]


def test_overrides_are_typed_like_the_field():
    config = apply_overrides(TrainingConfig(), ["optim.learning_rate=0.01", "ensemble_size=3"])
    assert config.optim.learning_rate == 0.01 and config.ensemble_size == 3
    assert TrainingConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("optim.learning_rate", "must look like section.field=value"),
        ("optim.speed=3", "unknown field 'speed'"),
        ("optim=3", "'optim' is a section"),
        ("ensemble_size=many", "'many' is not a valid int"),
    ],
)
def test_bad_overrides_name_what_is_wrong(assignment, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_overrides(TrainingConfig(), [assignment])


def test_cli_help_explains_each_train_option():
    result = subprocess.run(
        [sys.executable, "-m", "training", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("--ensemble-size", "--epochs", "--data-dir", "--output-dir", "--set"):
        assert option in result.stdout


def test_cli_reports_a_bad_override_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training", "train", "--output-dir", str(tmp_path), "--set", "x=1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "error: override 'x=1': unknown field 'x'" in result.stderr
    assert "Traceback" not in result.stderr
