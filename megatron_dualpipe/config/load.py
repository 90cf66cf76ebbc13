"""Load a YAML recipe: resolve `include:`, apply `--set a.b=v` overrides, validate.

Every problem is raised as one `UserError` that names the recipe field path.
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from megatron_dualpipe.config.rules import RECIPE_RULES, check_recipe
from megatron_dualpipe.config.schema import Recipe
from megatron_dualpipe.errors import UserError

MAX_INCLUDE_DEPTH = 8


# libyaml's parser when PyYAML has it (about 10x faster than the pure-Python one).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class StrictLoader(_SafeLoader):
    """YAML's safe loader, but a key repeated in one mapping is an error (not "last wins")."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-4` and `1e12` (no dot) as strings.
StrictLoader.yaml_implicit_resolvers = {
    key: list(value) for key, value in _SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    """Parse YAML text strictly (duplicate keys are errors)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    try:
        data = parse_yaml(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"recipe file not found: {path}") from None
    except OSError as err:
        raise UserError(f"recipe {path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(
            f"recipe {path}: not UTF-8 text (byte {err.start}: {err.object[err.start]:#04x})"
        ) from None
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path}: invalid YAML: {_one_line(err)}") from None
    if data is None:
        raise UserError(f"recipe {path}: the file is empty (no recipe fields)")
    if not isinstance(data, dict):
        raise UserError(  # noqa: TRY004 - every recipe problem is a UserError (CLI: exit 2)
            f"recipe {path}: top level must be a mapping, got {type(data).__name__}"
        )
    return data


def _one_line(err: yaml.YAMLError) -> str:
    """PyYAML's message without the quoted source lines: `problem at line L, column C`."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is None:
        return problem
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


def deep_merge(base: dict, override: dict) -> dict:
    """Merge `override` into a copy of `base`; nested mappings merge, other values replace."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_raw(path: str | Path, _depth: int = 0, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a recipe and everything it includes (paths relative to the including file).

    Included files merge in order, then the including file's own keys override them. A file
    that includes itself (directly or through others) or nests deeper than
    `MAX_INCLUDE_DEPTH` is an error.
    """
    path = Path(path)
    if _chain:
        parent = _chain[-1]
        if path.resolve() in {p.resolve() for p in _chain}:
            cycle = " -> ".join(str(p) for p in (*_chain, path))
            raise UserError(f"recipe {parent}: include: cycle: {cycle}")
        if _depth > MAX_INCLUDE_DEPTH:
            raise UserError(
                f"recipe {parent}: include: nested deeper than {MAX_INCLUDE_DEPTH} levels "
                f"(at {path})"
            )
        if not path.is_file():
            raise UserError(f"recipe {parent}: include: file not found: {path}")
    data = _read_yaml(path)
    includes = data.pop("include", None)
    if includes is None:
        return data
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise UserError(f"recipe {path}: include: must be a path or a list of paths")
    merged: dict = {}
    for include in includes:
        merged = deep_merge(merged, load_raw(path.parent / include, _depth + 1, (*_chain, path)))
    return deep_merge(merged, data)


def _section_fields(model: type[BaseModel], parts: list[str]) -> tuple[type[BaseModel], str]:
    """Walk the schema along `parts[:-1]`; returns the owning model and the field name."""
    for i, part in enumerate(parts[:-1]):
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            path = ".".join(parts[: i + 1])
            allowed = ", ".join(
                name
                for name, f in model.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
            )
            raise UserError(  # noqa: TRY004 - a recipe problem, as above
                f"--set {'.'.join(parts)}: '{path}' is not a section; sections: {allowed}"
            )
        model = annotation
    return model, parts[-1]


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Apply `section.field=value` strings; values are parsed as YAML (`2`, `true`, `[1,2]`)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. parallel.pp=2")
        parts = key.strip().split(".")
        _section_fields(Recipe, parts)
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(  # noqa: TRY004 - a recipe problem, as above
                    f"--set {item}: '{part}' is not a mapping in the recipe"
                )
        node[parts[-1]] = value
    return raw


def _allowed_values(model: type[BaseModel], loc: tuple) -> str:
    """Describe the allowed values of the field at `loc` (for unknown/invalid fields)."""
    owner: Any = model
    for part in loc[:-1]:
        field = owner.model_fields.get(part) if isinstance(owner, type) else None
        if field is None or not (isinstance(field.annotation, type)):
            return ""
        owner = field.annotation
    if not (isinstance(owner, type) and issubclass(owner, BaseModel)):
        return ""
    field = owner.model_fields.get(loc[-1])
    if field is None:
        return "allowed fields: " + ", ".join(owner.model_fields)
    args = typing.get_args(field.annotation)
    literal = [a for a in args if typing.get_origin(a) is typing.Literal]
    if typing.get_origin(field.annotation) is typing.Literal:
        return "allowed values: " + ", ".join(map(str, args))
    if literal:
        return "allowed values: " + ", ".join(map(str, typing.get_args(literal[0])))
    return ""


def _field_loc(loc: tuple) -> tuple:
    """The part of an error location that names a recipe field (pydantic appends the member
    type, e.g. `str`, when a union field matches none of its members)."""
    owner: Any = Recipe
    for i, part in enumerate(loc):
        field = owner.model_fields.get(part) if isinstance(owner, type) else None
        if field is None:
            return loc[:i] if i else loc
        owner = field.annotation
        if not (isinstance(owner, type) and issubclass(owner, BaseModel)):
            return loc[: i + 1]
    return loc


def _merge_union_errors(errors: list[dict]) -> list[dict]:
    """One error per union field that matched none of its members: "expected one of ..."."""
    groups: dict[tuple, list[dict]] = {}
    for e in errors:
        groups.setdefault(_field_loc(tuple(str(p) for p in e["loc"])), []).append(e)
    merged = []
    for loc, group in groups.items():
        if len(group) > 1 and all(tuple(map(str, e["loc"])) != loc for e in group):
            kinds = ", ".join(e["msg"].removeprefix("Input should be ") for e in group)
            merged.append({"loc": loc, "type": "union", "msg": f"expected one of: {kinds}",
                           "input": group[0].get("input")})
        else:
            merged += group
    return merged


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in _merge_union_errors(err.errors()):
        loc = tuple(str(p) for p in e["loc"])
        path = ".".join(loc)
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "value_error":  # our own validators: the message says it all
            msg = str(e["ctx"]["error"]) if "error" in e.get("ctx", {}) else e["msg"]
        else:
            msg = e["msg"]
            if "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        allowed = _allowed_values(Recipe, loc)
        lines.append(f"{path}: {msg}" + (f"; {allowed}" if allowed else ""))
    if len(lines) == 1:
        return f"invalid recipe {source}: {lines[0]}"
    return f"invalid recipe {source}:\n  " + "\n  ".join(lines)


def parse_recipe(raw: dict, source: str = "<dict>") -> Recipe:
    """Validate a raw mapping into a `Recipe` and check the cross-field `RECIPE_RULES`."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None
    check_recipe(recipe, source, RECIPE_RULES)
    return recipe


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Load, include, override and validate a recipe file."""
    raw = apply_overrides(load_raw(path), overrides)
    return parse_recipe(raw, str(path))
