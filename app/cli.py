"""Command-line options of ``gradient-uncertainty-serve``; flags override the environment.

Every flag is one field of :class:`app.config.Settings`. A flag that is given wins over
its ``GRADUNC_*`` variable, which wins over the default, and the same validators check
all three, so a bad value is refused before the server starts, with a message that names
the setting. There is no ``--workers``: the dynamic batcher and the onnxruntime sessions
belong to one process, which already uses every core (run one process per machine, or
several containers behind a load balancer).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.config import ENV_PREFIX, Settings

__all__ = ["build_parser", "missing_bundle_message", "settings_from_args"]

PROGRAM = "gradient-uncertainty-serve"

#: (flag, settings field, type, metavar, help) of every option.
_OPTIONS: tuple[tuple[str, str, type, str, str], ...] = (
    ("--host", "host", str, "HOST", "interface to bind; 0.0.0.0 in a container"),
    ("--port", "port", int, "PORT", "TCP port to listen on (1-65535)"),
    (
        "--bundle-dir",
        "bundle_dir",
        Path,
        "DIR",
        "model bundle folder to load (manifest.json inside); the default is the bundle "
        "shipped with the package",
    ),
    (
        "--log-level",
        "log_level",
        str,
        "LEVEL",
        "critical, error, warning, info, debug or trace",
    ),
)
_FLAGS = {field: flag for flag, field, *_ in _OPTIONS}


def _help(field: str, text: str) -> str:
    default = Settings.model_fields[field].default
    return f"{text} (environment: {ENV_PREFIX}{field.upper()}; default: {default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Serve the gradient-uncertainty scoring API (FastAPI on uvicorn). "
        f"Every other setting is an environment variable {ENV_PREFIX}<NAME> "
        "(README, 'Configuration').",
        epilog="Example: gradient-uncertainty-serve --port 8080 --bundle-dir models/my-bundle",
    )
    for flag, field, kind, metavar, text in _OPTIONS:
        parser.add_argument(flag, dest=field, type=kind, metavar=metavar, help=_help(field, text))
    return parser


def _describe(error: ValidationError) -> str:
    """One line per invalid setting, without pydantic's boilerplate."""
    lines = []
    for item in error.errors():
        message = str(item.get("msg", "invalid"))
        message = message.removeprefix("Value error, ")
        field = ".".join(str(part) for part in item.get("loc", ()))
        name = f"{ENV_PREFIX}{field.upper()}"
        if field in _FLAGS:
            name = f"{_FLAGS[field]} / {name}"
        lines.append(message if ENV_PREFIX in message else f"{name}: {message}")
    return "; ".join(lines)


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    """The settings for this run: flags, then ``GRADUNC_*`` variables, then defaults.

    Exits with status 2 and a message naming the setting when a value is invalid.
    """
    parser = build_parser()
    arguments = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        field: value for field, value in vars(arguments).items() if value is not None
    }
    try:
        return Settings(**overrides)
    except ValidationError as error:
        parser.error(f"invalid setting: {_describe(error)}")
        raise  # parser.error exits; this line is never reached


def missing_bundle_message(settings: Settings) -> str | None:
    """Why the configured bundle cannot be served, or None when its manifest is there."""
    manifest = Path(settings.bundle_dir) / "manifest.json"
    if manifest.is_file():
        return None
    return (
        f"{PROGRAM}: no model bundle at {settings.bundle_dir} ({manifest.name} is missing). "
        f"Point --bundle-dir or {ENV_PREFIX}BUNDLE_DIR at a bundle folder (one built by "
        "`python -m training build`, or the default bundle shipped with the package)."
    )
