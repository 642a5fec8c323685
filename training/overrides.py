"""``--set section.field=value`` overrides for any field of a configuration dataclass.

Works on :class:`~training.config.BuildConfig` (the whole tree) and on any of its parts,
such as :class:`~training.config.TrainingConfig`. On a ``BuildConfig`` a path whose first
name is a training field (``optim.learning_rate``) is read as ``training.<path>``.
"""

from __future__ import annotations

import dataclasses

from training.config import TrainingConfig  # noqa: F401 - doctest


def apply_overrides(config, assignments: list[str]):
    """Return a copy of ``config`` with each ``path=value`` applied, typed like the field.

    >>> apply_overrides(TrainingConfig(), ["optim.learning_rate=0.01"]).optim.learning_rate
    0.01
    """
    for assignment in assignments:
        path, separator, raw_value = assignment.partition("=")
        if not separator:
            raise ValueError(f"override {assignment!r} must look like section.field=value")
        names = path.strip().split(".")
        own = {f.name for f in dataclasses.fields(config)}
        if names[0] not in own and "training" in own:
            names = ["training", *names]
        config = _replace_path(config, names, raw_value.strip(), assignment)
    return config


def _replace_path(node, path: list[str], raw_value: str, assignment: str):
    fields = {f.name: f for f in dataclasses.fields(node)}
    name = path[0]
    if name not in fields:
        raise ValueError(
            f"override {assignment!r}: unknown field {name!r}; choose from {sorted(fields)}"
        )
    current = getattr(node, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"override {assignment!r}: {name!r} has no sub-fields")
        return dataclasses.replace(
            node, **{name: _replace_path(current, path[1:], raw_value, assignment)}
        )
    if dataclasses.is_dataclass(current):
        raise ValueError(f"override {assignment!r}: {name!r} is a section, name one of its fields")
    try:
        value = _parse(current, raw_value)
    except ValueError as error:
        raise ValueError(
            f"override {assignment!r}: {raw_value!r} is not a valid {type(current).__name__}"
        ) from error
    return dataclasses.replace(node, **{name: value})


def _parse(current, raw_value: str):
    """``raw_value`` typed like ``current``: bools from true/false, tuples comma-separated."""
    if isinstance(current, bool):
        lowered = raw_value.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(raw_value)
        return lowered in ("true", "1")
    if isinstance(current, tuple):
        if current and not all(isinstance(item, str) for item in current):
            raise ValueError(f"{raw_value!r}: only tuples of names can be overridden")
        return tuple(item.strip() for item in raw_value.split(",") if item.strip())
    return type(current)(raw_value)
