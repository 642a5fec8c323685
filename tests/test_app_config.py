"""Settings: the GRADUNC_ environment, defaults, and errors that name the variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import DEFAULT_BUNDLE_DIR, Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GRADUNC_") and name != "GRADUNC_DATA_DIR":
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = Settings()
    assert settings.bundle_dir == DEFAULT_BUNDLE_DIR
    assert Path(__file__).resolve().parents[1] / "models" / "default" == DEFAULT_BUNDLE_DIR
    assert settings.api_key is None and settings.providers is None
    assert settings.queue_max >= settings.max_batch_images


def test_values_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADUNC_PORT", "9001")
    monkeypatch.setenv("GRADUNC_BUNDLE_DIR", "/srv/models/default")
    monkeypatch.setenv("GRADUNC_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    monkeypatch.setenv("GRADUNC_API_KEY", "abc")
    monkeypatch.setenv("GRADUNC_MAX_WAIT_MS", "0")
    settings = Settings()
    assert settings.port == 9001
    assert settings.bundle_dir == Path("/srv/models/default")
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "abc"
    assert "abc" not in repr(settings)
    assert settings.max_wait_s == 0


def test_an_empty_api_key_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADUNC_API_KEY", "")
    assert Settings().api_key is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GRADUNC_PORT", "0", "GRADUNC_PORT must be between 1 and 65535, got 0"),
        ("GRADUNC_MAX_BODY_BYTES", "0", "GRADUNC_MAX_BODY_BYTES must be at least 1, got 0"),
        ("GRADUNC_MAX_BATCH_SIZE", "-3", "GRADUNC_MAX_BATCH_SIZE must be at least 1, got -3"),
        ("GRADUNC_MAX_WAIT_MS", "5000", "GRADUNC_MAX_WAIT_MS must be between 0 and 1000"),
        ("GRADUNC_ENGINE_THREADS", "0", "GRADUNC_ENGINE_THREADS must be at least 1 (or unset)"),
        ("GRADUNC_LOG_LEVEL", "loud", "GRADUNC_LOG_LEVEL must be one of"),
        (
            "GRADUNC_PROVIDERS",
            "CUDAExecutionProvidr",
            "GRADUNC_PROVIDERS names unknown onnxruntime execution providers "
            "['CUDAExecutionProvidr']",
        ),
        (
            "GRADUNC_QUEUE_MAX",
            "10",
            "GRADUNC_QUEUE_MAX (10) must be at least GRADUNC_MAX_BATCH_IMAGES (256)",
        ),
        ("GRADUNC_API_KEY", " padded ", "GRADUNC_API_KEY must be printable ASCII"),
    ],
)
def test_bad_values_are_rejected_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings()


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]
