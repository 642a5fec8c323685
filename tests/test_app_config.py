"""Settings: the GRADUNC_ environment, defaults, and errors that name the variable."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
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
    monkeypatch.setenv("GRADUNC_API_KEY", "abcdefghijklmnop")
    monkeypatch.setenv("GRADUNC_MAX_WAIT_MS", "0")
    monkeypatch.setenv("GRADUNC_FORWARDED_ALLOW_IPS", "10.0.0.0/8, 192.168.1.5")
    settings = Settings()
    assert settings.port == 9001
    assert settings.bundle_dir == Path("/srv/models/default")
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "abcdefghijklmnop"
    assert "abcdefghijklmnop" not in repr(settings)
    assert settings.max_wait_s == 0
    assert settings.forwarded_allow_ips == ["10.0.0.0/8", "192.168.1.5"]


def test_hardening_defaults() -> None:
    """The limits of issue "Hardening, round 2", as documented."""
    settings = Settings()
    assert settings.max_image_pixels == 16_000_000  # a digit needs far less than 40 MP
    assert (settings.max_image_frames, settings.max_request_pixels) == (100, 32_000_000)
    assert (settings.decode_workers, settings.decode_timeout_s) == (2, 10.0)
    assert settings.decode_memory_mb == 1024
    assert (settings.header_timeout_s, settings.body_timeout_s) == (10.0, 15.0)
    assert settings.body_timeout_s <= 15 and settings.keep_alive_timeout_s == 5
    assert (settings.max_header_bytes, settings.max_header_count) == (16 * 1024, 100)
    assert settings.forwarded_allow_ips == []  # no proxy is trusted by default
    assert settings.protect_all_endpoints is False and settings.bundle_public_key is None
    assert (settings.auth_max_failures, settings.auth_failure_window_s) == (10, 60.0)


def test_every_setting_is_documented() -> None:
    import ast
    import inspect

    import app.config

    source = ast.parse(inspect.getsource(app.config.Settings))
    body = source.body[0].body  # type: ignore[attr-defined]
    documented = {
        statement.target.id
        for statement, following in zip(body, body[1:], strict=False)
        if isinstance(statement, ast.AnnAssign)
        and isinstance(following, ast.Expr)
        and isinstance(following.value, ast.Constant)
    }
    assert set(Settings.model_fields) <= documented, set(Settings.model_fields) - documented


def test_a_short_api_key_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADUNC_API_KEY", "k3y-of-9ch")
    with pytest.raises(ValidationError) as refused:
        Settings()
    message = str(refused.value)
    assert "GRADUNC_API_KEY is 10 characters long, shorter than the minimum of 16" in message
    assert "k3y-of-9ch" not in message


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
        ("GRADUNC_HEAD_THREADS", "0", "GRADUNC_HEAD_THREADS must be at least 1, got 0"),
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
        ("GRADUNC_BODY_TIMEOUT_S", "0", "GRADUNC_BODY_TIMEOUT_S must be more than 0"),
        ("GRADUNC_DECODE_WORKERS", "0", "GRADUNC_DECODE_WORKERS must be at least 1, got 0"),
        ("GRADUNC_MAX_HEADER_COUNT", "0", "GRADUNC_MAX_HEADER_COUNT must be at least 1"),
        (
            "GRADUNC_FORWARDED_ALLOW_IPS",
            "10.0.0.1,proxy.local",
            "GRADUNC_FORWARDED_ALLOW_IPS: 'proxy.local' is neither an IP address",
        ),
        ("GRADUNC_BUNDLE_PUBLIC_KEY", "/nonexistent/key.pub", "no file at /nonexistent/key.pub"),
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


def test_loading_the_bundle_sets_the_heads_openmp_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving process predicts with GRADUNC_HEAD_THREADS OpenMP threads (restored
    here afterwards: the setting is process-wide)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from app.service import load_bundle_scorer

    def openmp_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "openmp"}

    with threadpool_limits(2, user_api="openmp"):
        assert openmp_threads() == {2}  # so that the setting below is what changes it
        monkeypatch.setenv("GRADUNC_HEAD_THREADS", "1")
        scorer = load_bundle_scorer(Settings())
        assert openmp_threads() == {1}
        assert len(scorer.score(np.zeros((1, 28, 28), np.uint8))) == 1
