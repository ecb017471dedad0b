"""edgegraph.spec and edgegraph.registry: pass specs, option coercion, recipe files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import pytest

from edgegraph import spec
from edgegraph.errors import EdgegraphError, PassOptionError, UnknownPassError
from edgegraph.pipeline import Pass, PassResult, option
from edgegraph.registry import get_pass, list_passes, register_pass


@register_pass
@dataclass(frozen=True)
class SpecProbe(Pass):
    """A pass with one option of every kind the spec syntax supports."""

    name = "spec-probe"
    summary = "test pass for spec parsing"

    ratio: float = option(0.5, "a number in [0, 1]")
    count: int = option(3, "an integer")
    method: Literal["minmax", "entropy"] = option("minmax", "a choice")
    exclude: list[str] = option([], "a list of op types")
    enabled: bool = option(True, "a flag")
    limit: int | None = option(None, "an optional integer")
    label: str = option("x", "free text")
    max_items: int = option(10, "an option whose name has an underscore")

    def __post_init__(self):
        self.check(0 <= self.ratio <= 1, f"{self.name}.ratio must be in [0, 1], got {self.ratio}")

    def run(self, model, ctx):
        return PassResult(modified=False)


def test_parse_defaults_and_several_passes():
    passes = spec.parse(" spec-probe , spec-probe(count=1),")
    assert passes == [SpecProbe(), SpecProbe(count=1)]


def test_parse_every_kind_of_value():
    (p,) = spec.parse('spec-probe(ratio=1, count=7, method=entropy, exclude=[Softmax, "Resize"], enabled=false, '
                      'limit=none, label="a, (b)", max-items=4)')
    assert p == SpecProbe(ratio=1.0, count=7, method="entropy", exclude=["Softmax", "Resize"], enabled=False,
                          limit=None, label="a, (b)", max_items=4)
    assert isinstance(p.ratio, float)
    (p,) = spec.parse("spec-probe(exclude=Softmax, limit=5, label=12)")
    assert p.exclude == ["Softmax"] and p.limit == 5 and p.label == "12"


@pytest.mark.parametrize("p", [
    SpecProbe(),
    SpecProbe(ratio=0.125, count=-2),
    SpecProbe(method="entropy", exclude=["Softmax", "Resize"], enabled=False),
    SpecProbe(limit=0, label="with, comma and 'quotes' (and brackets)"),
    SpecProbe(label="", exclude=[]),
    SpecProbe(label="true"),
    SpecProbe(label="12", exclude=["none", "1.5"]),
    SpecProbe(label='say "hi"'),
    SpecProbe(max_items=1),
])
def test_format_pass_round_trips(p):
    text = spec.format_pass(p)
    assert spec.parse(text) == [p]


def test_format_pass_names_only_changed_options():
    assert spec.format_pass(SpecProbe()) == "spec-probe"
    assert spec.format_pass(SpecProbe(count=4, enabled=False)) == "spec-probe(count=4, enabled=false)"
    assert spec.format_pipeline([SpecProbe(), SpecProbe(exclude=["A", "B"])]) == "spec-probe,spec-probe(exclude=[A, B])"


@pytest.mark.parametrize("text, error, message", [
    ("spec-prob", UnknownPassError, "unknown pass 'spec-prob'; did you mean 'spec-probe'"),
    ("nothing-like-it", UnknownPassError, "available: .*spec-probe"),
    ("spec-probe(ration=0.2)", PassOptionError, r"has no option 'ration' \(options: ratio, count, method"),
    ("spec-probe(count=1.5)", PassOptionError, "spec-probe.count must be an integer, got 1.5"),
    ("spec-probe(count=true)", PassOptionError, "must be an integer"),
    ("spec-probe(enabled=yes)", PassOptionError, "spec-probe.enabled must be true or false, got 'yes'"),
    ("spec-probe(method=fast)", PassOptionError, "must be one of minmax, entropy, got 'fast'"),
    ("spec-probe(ratio=abc)", PassOptionError, "spec-probe.ratio must be a number"),
    ("spec-probe(ratio=2)", PassOptionError, r"ratio must be in \[0, 1\], got 2"),
    ("spec-probe(limit=x)", PassOptionError, "spec-probe.limit must be an integer"),
    ("spec-probe(exclude=[a, true])", PassOptionError, "spec-probe.exclude must be a string, got True"),
    ("spec-probe(ratio)", PassOptionError, "option 'ratio' needs the form key=value"),
    ("spec-probe(ratio=0.1", PassOptionError, "unbalanced brackets"),
    ("spec-probe(exclude=[a, b)", PassOptionError, "unbalanced brackets"),
    ('spec-probe(label="open)', PassOptionError, "unbalanced brackets or quotes"),
    ("spec-probe(count=1)x", PassOptionError, "options must end with '\\)'"),
    ("", EdgegraphError, "no passes given"),
    (" , ", EdgegraphError, "no passes given"),
])
def test_parse_errors(text, error, message):
    with pytest.raises(error, match=message) as caught:
        spec.parse(text)
    assert "\n" not in str(caught.value)


RECIPE = {"passes": ["spec-probe(count=2)",
                     {"spec-probe": {"method": "entropy", "exclude": ["Softmax"], "max-items": 3}},
                     {"spec-probe": None}]}
EXPECTED = [SpecProbe(count=2), SpecProbe(method="entropy", exclude=["Softmax"], max_items=3), SpecProbe()]


def test_recipe_json_and_yaml(tmp_path):
    as_json = tmp_path / "recipe.json"
    as_json.write_text(json.dumps(RECIPE))
    assert spec.load_recipe(as_json) == EXPECTED
    as_yaml = tmp_path / "recipe.yaml"
    as_yaml.write_text("passes:\n  - spec-probe(count=2)\n  - spec-probe:\n      method: entropy\n"
                       "      exclude: [Softmax]\n      max-items: 3\n  - spec-probe:\n")
    assert spec.load_recipe(as_yaml) == EXPECTED
    bare_list = tmp_path / "list.yml"
    bare_list.write_text("- spec-probe, spec-probe(enabled=false)\n")
    assert spec.load_recipe(bare_list) == [SpecProbe(), SpecProbe(enabled=False)]


@pytest.mark.parametrize("name, text, message", [
    ("bad.json", "{passes: [", "recipe .*bad.json is not valid JSON"),
    ("bad.yaml", "passes: [a, b\n", "is not valid YAML"),
    ("empty.json", '{"passes": []}', "needs a non-empty 'passes' list"),
    ("other.json", '{"steps": ["spec-probe"]}', "needs a non-empty 'passes' list"),
    ("number.json", '{"passes": [42]}', "each pass is a name or {name: {options}}, got 42"),
    ("two.json", '{"passes": [{"spec-probe": {}, "other": {}}]}', "each pass is a name or"),
    ("options.json", '{"passes": [{"spec-probe": [1, 2]}]}', "options of 'spec-probe' must be a mapping"),
    ("option.yaml", "passes:\n  - spec-probe: {count: many}\n", "spec-probe.count must be an integer"),
    ("unknown.json", '{"passes": ["nope"]}', "unknown pass 'nope'"),
])
def test_bad_recipes(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(EdgegraphError, match=message):
        spec.load_recipe(path)


def test_unreadable_recipe(tmp_path):
    with pytest.raises(EdgegraphError, match="cannot read recipe"):
        spec.load_recipe(tmp_path / "missing.json")


def test_describe_type():
    hints = {"ratio": float, "method": Literal["a", "b"], "exclude": list[str], "limit": int | None,
             "switch": bool | Literal["auto"]}
    assert {k: spec.describe_type(v) for k, v in hints.items()} == {
        "ratio": "float", "method": "a|b", "exclude": "[str, ...]", "limit": "int or none", "switch": "bool or auto"}


def test_registry():
    assert get_pass("spec-probe") is SpecProbe
    assert SpecProbe in list_passes()
    assert [p.name for p in list_passes()] == sorted(p.name for p in list_passes())
    register_pass(SpecProbe)  # registering the same class again is harmless (module reloads)

    @dataclass(frozen=True)
    class Impostor(Pass):
        name = "spec-probe"

    with pytest.raises(ValueError, match="pass name 'spec-probe' is taken"):
        register_pass(Impostor)

    @dataclass(frozen=True)
    class Nameless(Pass):
        pass

    with pytest.raises(TypeError, match="has no `name`"):
        register_pass(Nameless)
