"""``--set section.field=value`` overrides for any field of :class:`TrainingConfig`."""

from __future__ import annotations

import dataclasses

from training.config import TrainingConfig


def apply_overrides(config: TrainingConfig, assignments: list[str]) -> TrainingConfig:
    """Return a copy of ``config`` with each ``path=value`` applied, typed like the field.

    >>> apply_overrides(TrainingConfig(), ["optim.learning_rate=0.01"]).optim.learning_rate
    0.01
    """
    for assignment in assignments:
        path, separator, raw_value = assignment.partition("=")
        if not separator:
            raise ValueError(f"override {assignment!r} must look like section.field=value")
        config = _replace_path(config, path.strip().split("."), raw_value.strip(), assignment)
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
        value = type(current)(raw_value)
    except ValueError as error:
        raise ValueError(
            f"override {assignment!r}: {raw_value!r} is not a valid {type(current).__name__}"
        ) from error
    return dataclasses.replace(node, **{name: value})
