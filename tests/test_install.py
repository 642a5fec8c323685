"""Installing the project: the wheel carries the default bundle, the service runs anywhere.

The slow test builds the wheel from a copy of the sources (as the Dockerfile does),
installs it with ``pip install --no-deps --target`` (no network: the dependencies are
this environment's), and starts ``gradient-uncertainty-serve`` from an unrelated working
directory. The fast ones check the command line of the service and that pyproject.toml
lists every package folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from app.cli import settings_from_args
from tools.harness import free_port, wait_settled

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "examples" / "images" / "digit-7.png"
#: What the wheel is built from (the Dockerfile's wheel stage copies the same).
SOURCES = ("pyproject.toml", "README.md", "app", "scoring", "training", "gradunc_client")


def clean_environment(**extra: str) -> dict[str, str]:
    """This environment without GRADUNC_* settings, PYTHONPATH or a virtualenv marker."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GRADUNC_") and key not in ("PYTHONPATH", "PYTHONHOME")
    }
    return {**environment, **extra}


# -- pyproject.toml ------------------------------------------------------------------------


def test_pyproject_lists_every_package_folder() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(REPO_ROOT).parts)
        for top in ("app", "scoring", "training", "gradunc_client")
        for init in (REPO_ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    missing = found - listed
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {sorted(missing)}"
    assert config["package-dir"]["gradunc_models"] == "models"
    assert "gradunc_models" in listed


# -- the service's command line -------------------------------------------------------------


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRADUNC_PORT", "9001")
    monkeypatch.setenv("GRADUNC_LOG_LEVEL", "warning")
    from_environment = settings_from_args([])
    assert from_environment.port == 9001 and from_environment.log_level == "warning"
    flagged = settings_from_args(
        ["--port", "9002", "--host", "0.0.0.0", "--bundle-dir", str(tmp_path)]
    )
    assert flagged.port == 9002 and flagged.host == "0.0.0.0"
    assert flagged.bundle_dir == tmp_path and flagged.log_level == "warning"


def test_a_bad_flag_names_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        settings_from_args(["--port", "70000"])
    assert caught.value.code == 2
    assert "GRADUNC_PORT must be between 1 and 65535, got 70000" in capsys.readouterr().err


def test_serve_help_and_a_missing_bundle(tmp_path: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "app.main", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=clean_environment(),
    )
    assert help_text.returncode == 0, help_text.stderr
    for flag, variable in [
        ("--host", "GRADUNC_HOST"),
        ("--port", "GRADUNC_PORT"),
        ("--bundle-dir", "GRADUNC_BUNDLE_DIR"),
        ("--log-level", "GRADUNC_LOG_LEVEL"),
    ]:
        assert flag in help_text.stdout and variable in help_text.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "app.main", "--bundle-dir", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=clean_environment(),
    )
    assert missing.returncode == 2
    assert "no model bundle at" in missing.stderr and "GRADUNC_BUNDLE_DIR" in missing.stderr


# -- the wheel, installed elsewhere ---------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of the sources and installed with --target."""
    if not (REPO_ROOT / "models" / "default" / "manifest.json").is_file():
        pytest.fail("models/default has no manifest.json: there is no bundle to ship")
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    (source / "models").mkdir()
    shutil.copy2(REPO_ROOT / "models" / "__init__.py", source / "models")
    shutil.copytree(REPO_ROOT / "models" / "default", source / "models" / "default", ignore=ignore)
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), "."],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=source,
        env=clean_environment(),
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    [wheel] = wheels.glob("gradient_uncertainty-*.whl")
    target = root / "site"
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_environment(),
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return target


@pytest.mark.slow
def test_the_wheel_carries_the_bundle_the_examples_and_the_client(installed: Path) -> None:
    import json

    bundle = installed / "gradunc_models" / "default"
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert (bundle / entry["path"]).is_file(), entry["path"]
    assert (installed / "app" / "openapi_examples.json").is_file()
    assert (installed / "gradunc_client" / "py.typed").is_file()
    assert (installed / "bin" / "gradient-uncertainty-serve").is_file()
    assert (installed / "bin" / "gradient-uncertainty").is_file()
    assert not (installed / "models").exists()  # shipped as gradunc_models, not as "models"
    assert not (installed / "tools").exists() and not (installed / "tests").exists()
    wheel_names = zipfile.ZipFile(next(installed.parent.glob("wheels/*.whl"))).namelist()
    assert "gradunc_models/default/manifest.json" in wheel_names


@pytest.mark.slow
def test_the_installed_service_serves_the_shipped_bundle_from_any_directory(
    installed: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = free_port()
    environment = clean_environment(PYTHONPATH=str(installed))
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [str(installed / "bin" / "gradient-uncertainty-serve"), "--port", str(port)],
        cwd=elsewhere,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        status, ready = wait_settled(
            port, timeout_s=180, gone=lambda: None if process.poll() is None else "exited"
        )
        assert status == 200, ready
        # /readyz names the bundle, never its folder (no absolute paths in answers); the
        # installed copy is recognised by its model version.
        assert ready["bundle_dir"] == "default"
        shipped = json.loads(
            (installed / "gradunc_models" / "default" / "manifest.json").read_text()
        )
        assert ready["model_version"] == shipped["model_version"]
        response = httpx.post(
            f"http://127.0.0.1:{port}/score",
            content=SAMPLE.read_bytes(),
            headers={"content-type": "image/png"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["prediction"] == 7
        docs = httpx.get(f"http://127.0.0.1:{port}/docs/assets/swagger-ui.css")
        assert docs.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()

    scored = subprocess.run(
        [str(installed / "bin" / "gradient-uncertainty"), "score", "--no-progress", str(SAMPLE)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=elsewhere,
        env=environment,
    )
    assert scored.returncode == 0, scored.stderr
    assert '"prediction": 7' in scored.stdout
