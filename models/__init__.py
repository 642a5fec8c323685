"""The committed default model bundle, installed as the package ``gradunc_models``.

``pyproject.toml`` maps this folder to the package name ``gradunc_models`` and ships
``default/`` as package data, so a regular (non-editable) ``pip install`` carries the
bundle into site-packages and the service finds it from any working directory. The
folder itself stays ``models/`` so that the checkout's layout (``models/default``, other
bundles built beside it) does not change.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_BUNDLE_DIR"]

#: The default bundle shipped with the package (``manifest.json`` inside).
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "default"
