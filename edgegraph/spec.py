"""Pass specs: `-p "cleanup,quant(method=entropy, exclude=[Softmax, Resize])"` and recipe files.

One syntax: passes separated by commas; options in parentheses as `key=value`; values are
`true/false`, numbers, `none`, bare or quoted strings, or `[a, b]` lists. A recipe file (JSON or
YAML) holds `{"passes": ["cleanup", {"quant": {"method": "entropy"}}]}`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from edgegraph.errors import EdgegraphError, PassOptionError, shown
from edgegraph.passbase import Pass
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
                raise PassOptionError(f"'{shown(item)}': options must end with ')'")
            for pair in _split_top_level(rest.rstrip()[:-1], ","):
                if not pair.strip():
                    continue
                key, eq, value = pair.partition("=")
                if not eq:
                    raise PassOptionError(f"'{shown(name)}': option '{shown(pair.strip())}' needs the form key=value")
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
            raise PassOptionError(f"pass '{name}' has no option '{shown(key)}' (options: {known})")
        kwargs[key] = coerce(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


# A recipe is a few lines; the cap also bounds YAML parsing time (pure Python: ~1 s per 100 KB).
MAX_RECIPE_BYTES = 64 << 10


def load_recipe(path: str | Path) -> list[Pass]:
    """The passes of a recipe file: `{"passes": [...]}` (or the bare list) in JSON, or in YAML
    when the name ends in .yaml/.yml.

    Recipes are untrusted input: the file must be a regular file of at most MAX_RECIPE_BYTES of
    UTF-8, and YAML aliases (`*name`, which expand a few hundred bytes into gigabytes) are refused.
    """
    path = Path(path)
    kind = "YAML" if path.suffix in {".yaml", ".yml"} else "JSON"
    try:
        if not path.is_file():  # a FIFO would block, /dev/zero never ends
            raise EdgegraphError(f"cannot read recipe {path}: not a file" if path.exists()
                                 else f"cannot read recipe {path}: No such file or directory")
        with open(path, "rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise EdgegraphError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise EdgegraphError(f"recipe {path} is larger than {MAX_RECIPE_BYTES >> 10} KiB; a recipe lists passes")
    try:
        text = raw.decode("utf-8-sig")  # a BOM is fine
    except UnicodeDecodeError as exc:
        raise EdgegraphError(f"recipe {path} is not UTF-8 text (byte {exc.start})") from None
    try:
        recipe = _load_yaml(text) if kind == "YAML" else json.loads(text)
    except RecursionError:
        raise EdgegraphError(f"recipe {path} is nested too deeply to be a recipe") from None
    except Exception as exc:  # noqa: BLE001 - json/yaml errors
        raise EdgegraphError(f"recipe {path} is not valid {kind}: {shown(str(exc))}") from None
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
        elif isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item)), str):
            (name, options), = item.items()
            if options is not None and not isinstance(options, dict):
                raise EdgegraphError(f"{where}: options of '{shown(name)}' must be a mapping {{option name: value}}")
            if not all(isinstance(key, str) for key in options or {}):
                raise EdgegraphError(f"{where}: option names of '{shown(name)}' must be strings")
            passes.append(build(name, options or {}))
        else:
            raise EdgegraphError(f"{where}: each pass is a name or {{name: {{options}}}}, got {shown(item)}")
    return passes


def _load_yaml(text: str) -> Any:
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"aliases (*name) are not allowed in a recipe (line {mark.line + 1})")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliases)  # noqa: S506 - a SafeLoader


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
        raise PassOptionError(errors[0] if errors else f"{where}: bad value {shown(repr(value))}")
    if origin is Literal:
        if value in args:
            return value
        raise PassOptionError(f"{where} must be one of {', '.join(map(str, args))}, got {shown(repr(value))}")
    if origin in (list, tuple, frozenset, set):
        items = value if isinstance(value, list | tuple) else [value]
        inner = args[0] if args else str
        return origin(coerce(v, inner, where) for v in items) if origin is not tuple else tuple(
            coerce(v, inner, where) for v in items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise PassOptionError(f"{where} must be true or false, got {shown(repr(value))}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise PassOptionError(f"{where} must be an integer, got {shown(repr(value))}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise PassOptionError(f"{where} must be a number, got {shown(repr(value))}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise PassOptionError(f"{where} must be a string, got {shown(repr(value))}")
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
        raise PassOptionError(f"unbalanced brackets or quotes in pass spec '{shown(text)}'")
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
