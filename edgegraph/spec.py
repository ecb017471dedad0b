"""Pass specs: `-p "cleanup,quant(method=entropy, exclude=[Softmax, Resize])"` and recipe files.

One syntax: passes separated by commas; options in parentheses as `key=value`; values are
`true/false`, numbers, `none`, bare or quoted strings, or `[a, b]` lists. A recipe file (JSON or
YAML) holds `{"passes": ["cleanup", {"quant": {"method": "entropy"}}]}`.
"""

from __future__ import annotations

import dataclasses
import json
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from edgegraph.errors import EdgegraphError, PassOptionError
from edgegraph.pipeline import Pass
from edgegraph.registry import get_pass


def parse(spec: str) -> list[Pass]:
    """`"a,b(x=1)"` -> [A(), B(x=1)]."""
    passes = []
    for item in _split_top_level(spec, ","):
        item = item.strip()
        if not item:
            continue
        name, _, rest = item.partition("(")
        name = name.strip()
        options: dict[str, str] = {}
        if rest:
            if not rest.rstrip().endswith(")"):
                raise PassOptionError(f"'{item}': options must end with ')'")
            for pair in _split_top_level(rest.rstrip()[:-1], ","):
                if not pair.strip():
                    continue
                key, eq, value = pair.partition("=")
                if not eq:
                    raise PassOptionError(f"'{name}': option '{pair.strip()}' needs the form key=value")
                options[key.strip()] = _parse_value(value.strip())
        passes.append(build(name, options))
    if not passes:
        raise EdgegraphError("no passes given (-p takes e.g. 'cleanup,quant')")
    return passes


def build(name: str, options: dict[str, Any]) -> Pass:
    """Instantiate pass `name` with options coerced to the types its fields declare."""
    cls = get_pass(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in options.items():
        key = key.replace("-", "_")
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise PassOptionError(f"pass '{name}' has no option '{key}' (options: {known})")
        kwargs[key] = coerce(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


def load_recipe(path: str | Path) -> list[Pass]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise EdgegraphError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        if path.suffix in {".yaml", ".yml"}:
            import yaml

            recipe = yaml.safe_load(text)
        else:
            recipe = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - json/yaml errors
        raise EdgegraphError(f"recipe {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {exc}") from None
    items = recipe.get("passes") if isinstance(recipe, dict) else recipe
    if not isinstance(items, list) or not items:
        raise EdgegraphError(f"recipe {path} needs a non-empty 'passes' list")
    return from_items(items, f"recipe {path}")


def from_items(items: list, where: str) -> list[Pass]:
    """A recipe's pass list: spec strings, {name: {options}} and (from the library) Pass objects."""
    passes = []
    for item in items:
        if isinstance(item, Pass):
            passes.append(item)
        elif isinstance(item, str):
            passes.extend(parse(item))
        elif isinstance(item, dict) and len(item) == 1:
            (name, options), = item.items()
            if not isinstance(name, str):
                raise EdgegraphError(f"{where}: a pass name must be a string, got {reprlib.repr(name)}")
            if options is not None and (not isinstance(options, dict) or not all(isinstance(k, str) for k in options)):
                raise EdgegraphError(f"{where}: options of '{name[:80]}' must be a mapping {{option name: value}}")
            passes.append(build(name, options or {}))
        else:
            raise EdgegraphError(f"{where}: each pass is a name or {{name: {{options}}}}, got {reprlib.repr(item)}")
    return passes


def format_pass(p: Pass) -> str:
    """The spec string that rebuilds `p` (only options that differ from the defaults)."""
    changed = p.changed_options()
    if not changed:
        return p.name
    return f"{p.name}({', '.join(f'{k}={_format_value(v)}' for k, v in changed.items())})"


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(format_pass(p) for p in passes)


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert a parsed value against a field's type annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except PassOptionError as exc:
                errors.append(str(exc))
        raise PassOptionError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise PassOptionError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin in (list, tuple, frozenset, set):
        items = value if isinstance(value, list | tuple) else [value]
        inner = args[0] if args else str
        return origin(coerce(v, inner, where) for v in items) if origin is not tuple else tuple(
            coerce(v, inner, where) for v in items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise PassOptionError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise PassOptionError(f"{where} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise PassOptionError(f"{where} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise PassOptionError(f"{where} must be a string, got {value!r}")
    return value


def describe_type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        described = " or ".join(describe_type(a) for a in args if a is not type(None))
        return described + " or none" if type(None) in args else described
    if origin in (list, tuple, frozenset, set):
        return f"[{describe_type(args[0]) if args else 'str'}, ...]"
    return getattr(annotation, "__name__", str(annotation))


def _split_top_level(text: str, sep: str) -> list[str]:
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if depth != 0 or quote:
        raise PassOptionError(f"unbalanced brackets or quotes in pass spec '{text}'")
    parts.append("".join(current))
    return parts


def _parse_value(text: str) -> Any:
    if text.startswith("[") and text.endswith("]"):
        return [_parse_value(v.strip()) for v in _split_top_level(text[1:-1], ",") if v.strip()]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    lowered = text.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    if lowered in {"none", "null"}:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, str) and (not value or any(c in value for c in ",()[]=' \"") or _parse_value(value) != value):
        # Quoted strings are taken verbatim (no escapes), so pick the quote the text lacks;
        # "true", "none" and "12" need quotes too, or they come back as bool, None and int.
        quote = "'" if '"' in value else '"'
        return f"{quote}{value}{quote}"
    return str(value)
