"""Config files: read a TOML (or a run's config.json) into the config tree, write one back.

    fasthpa train --config hpa.toml --lr 3e-3          # flags override the file
    fasthpa train --config runs/r18/config.json        # replay a run
    fasthpa train --print-config > hpa.toml            # the resolved config, as TOML

A file holds sections named like the config tree (``[data]``, ``[model]``, ``[loss]``,
``[optim]``, ``[speed]``, ``[run]``) with the fields' names as keys. Unknown sections or keys,
values of the wrong type and bad values are one line naming the key and the file::

    [run]
    epochs = 3
    batch_size = 32
    [data]
    image_size = 128
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

from fasthpa.errors import UserError


def read_config_file(path: str | Path, sections: dict[str, type]) -> dict[str, dict[str, Any]]:
    """The file's values as ``{section: {field: value}}``, every key known and every value of
    its field's type (ints accepted for floats); a UserError naming the key and file else."""
    path = Path(path)
    raw = _parse(path)
    out: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in sections:
            known = ", ".join(sections)
            raise UserError(f"{path}: unknown section [{section}] (the sections are {known}).")
        if not isinstance(values, dict):
            raise UserError(f"{path}: [{section}] must be a table of settings.")
        hints = typing.get_type_hints(sections[section])
        names = {f.name for f in dataclasses.fields(sections[section])}
        out[section] = {}
        for key, value in values.items():
            if key not in names:
                raise UserError(f"{path}: [{section}] {key}: unknown setting.")
            out[section][key] = _typed(value, hints[key], f"{path}: [{section}] {key}")
    return out


def _parse(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--config {path}: file not found.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot be read ({e}).") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--config {path}: not valid JSON ({e}).") from None
    else:
        try:
            data = _tomllib().loads(text)
        except Exception as e:  # tomllib.TOMLDecodeError (tomli's on Python 3.10)
            raise UserError(f"--config {path}: not valid TOML ({e}).") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected sections of settings.")
    return data


def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def _typed(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked against a field's annotation (str, int, float, bool, or X | None)."""
    args = typing.get_args(annotation)
    nullable = type(None) in args
    tp = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if value is None and nullable:
        return None
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"{where} = {value!r}: expected {_type_name(tp, nullable)}.")
    return value


def _type_name(tp: Any, nullable: bool) -> str:
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]
    return name + (" (or leave it out for none)" if nullable else "")


def to_toml(config: dict[str, dict[str, Any]]) -> str:
    """The config tree as TOML, one table per section; None values are left out (they are
    every nullable field's default, so reading the file back gives the same config)."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's
