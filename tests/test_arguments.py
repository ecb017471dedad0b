"""Arguments of the command line and of the library calls: bad ones are one clear refusal
(exit 2 / EdgegraphError), never a TypeError, a file read from elsewhere, or minutes of work."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest
from clihelp import assert_refused
from conftest import DEFAULT_DIR

import edgegraph
from edgegraph import registry, targets
from edgegraph.cli import main
from edgegraph.errors import EdgegraphError
from edgegraph.pipeline import Pass, PassResult, option

DIGITS = DEFAULT_DIR / "digits_cnn.onnx"
CALIB = DEFAULT_DIR / "digits_calib.npz"


def refused(capsys, tmp_path: Path, *args, phrase: str) -> str:
    """`clihelp.assert_refused` on `args`, the bundled model and data unchanged too."""
    return assert_refused(capsys, tmp_path, args, phrase, inputs=(DIGITS, CALIB))


@dataclasses.dataclass(frozen=True)
class Record(Pass):
    """Remembers the context and options it ran with."""

    name = "test-record"
    summary = "Record the context (test pass)"
    exact = True
    label: str = option("", "any text")
    seen = []

    def run(self, model, ctx):
        Record.seen.append((self.label, ctx))
        return PassResult(False)


@pytest.fixture(autouse=True)
def record_pass():
    registry._load_builtins()
    registry.register_pass(Record)
    Record.seen.clear()
    yield
    registry._PASSES.pop(Record.name, None)


# ---------------------------------------------------------------------------------------------
# --target


def test_target_names_a_profile_never_a_path(capsys, tmp_path, monkeypatch):
    (tmp_path / "evil.toml").write_text('description = "read from outside the profiles"\n')
    opened = []
    load = targets.tomllib.load
    monkeypatch.setattr(targets.tomllib, "load", lambda handle: opened.append(handle.name) or load(handle))
    relative = os.path.relpath(tmp_path / "evil", targets.PROFILE_DIR)
    for name in (relative, str(tmp_path / "evil"), "cpu/../cpu", "cpu.toml", ""):
        refused(capsys, tmp_path, "opt", DIGITS, "-p", "test-record", "-o", tmp_path / "o.onnx", "--target", name,
                phrase="unknown target")
    assert not any("evil" in name for name in opened)


@pytest.mark.parametrize(("text", "phrase"), [
    ("ops = [", "bad.toml: "),
    ('ops = "Conv"', "bad.toml: ops: must be a list of str"),
    ("quantized_ops = [1, 2]", "bad.toml: quantized_ops: must be a list of str"),
    ("description = 3", "bad.toml: description: must be str"),
    ('speed = "fast"', "bad.toml: speed: unknown key"),
    (b"description = '\xff'", "bad.toml: "),
])
def test_a_malformed_target_profile_is_exit_2_naming_file_and_key(capsys, tmp_path, monkeypatch, text, phrase):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "cpu.toml").write_bytes((targets.PROFILE_DIR / "cpu.toml").read_bytes())
    (profiles / "bad.toml").write_bytes(text if isinstance(text, bytes) else text.encode())
    monkeypatch.setattr(targets, "PROFILE_DIR", profiles)
    refused(capsys, tmp_path, "opt", DIGITS, "-p", "test-record", "-o", tmp_path / "o.onnx", "--target", "bad",
            phrase=phrase)
    with pytest.raises(EdgegraphError, match=phrase.replace("[", r"\[")):
        targets.load_target("bad")


# ---------------------------------------------------------------------------------------------
# --seed, --fix-shape, --image-size, --runs


@pytest.mark.parametrize(("args", "phrase"), [
    (["--seed", "-1"], "argument --seed: expected a whole number >= 0, got '-1'"),
    (["--seed", "1.5"], "argument --seed"),
    (["--seed", "٣"], "argument --seed"),  # a digit, but not an ASCII one
    (["--fix-shape", "input=1x3x100000x100000"], "3e+10 elements, more than the 2147483648"),
    (["--fix-shape", "input=1000000x1000000"], "1e+12 elements"),
    (["--fix-shape", "input=" + "9" * 5000], "argument --fix-shape"),
    (["--image-size", "100000x100000", "--calib", CALIB], "argument --image-size"),
])
def test_bad_numbers_are_refused_while_parsing(capsys, tmp_path, args, phrase):
    start = time.perf_counter()
    err = refused(capsys, tmp_path, "opt", DIGITS, "-p", "test-record", "-o", tmp_path / "o.onnx", *args,
                  phrase=phrase)
    assert time.perf_counter() - start < 5
    assert len(err) < 300


def test_bench_seed_is_checked_too(capsys, tmp_path):
    refused(capsys, tmp_path, "bench", DIGITS, "--seed", "-3", phrase="argument --seed")


def test_the_largest_allowed_shape_is_accepted_while_parsing():
    from edgegraph import checks, cli

    assert cli._dims("2x1024x1024x1024") == [2, 1024, 1024, 1024]  # exactly MAX_INPUT_ELEMENTS
    with pytest.raises(EdgegraphError, match="elements"):
        checks.dims([2, 1024, 1024, 1025], "shape")


@pytest.mark.parametrize(("runs", "timing"), [("0", False), ("1", True)])
def test_runs_0_turns_off_the_passes_own_timing(capsys, tmp_path, runs, timing):
    code = main(["opt", str(DIGITS), "-p", "test-record", "-o", str(tmp_path / "o.onnx"), "--runs", runs, "--quiet"])
    assert code == 0, capsys.readouterr().err
    [(_, ctx)] = Record.seen
    assert ctx.timing is timing


# ---------------------------------------------------------------------------------------------
# Library calls


BAD_CALLS = {
    "passes=42": ({"passes": 42}, "passes must be a spec string, a recipe path, a list or a {name: options} mapping"),
    "passes=[]": ({"passes": []}, "no passes given"),
    "passes={}": ({"passes": {}}, "no passes given"),
    "passes=''": ({"passes": ""}, "no passes given"),
    "passes=[42]": ({"passes": [42]}, "each pass is a name or {name: {options}}, got 42"),
    "bogus method": ({"passes": {"quant": {"method": "bogus"}}}, "quant.method must be one of"),
    "options not a mapping": ({"passes": {"quant": [1]}}, "options of 'quant' must be a mapping"),
    "unknown option": ({"passes": {"test-record": {"colour": "red"}}}, "has no option 'colour'"),
    "calib=3.5": ({"calib": 3.5}, "calibration data must be a path"),
    "target=None": ({"target": None}, "unknown target NoneType"),
    "target path": ({"target": "../targets/cpu"}, "unknown target '../targets/cpu'"),
    "seed='x'": ({"seed": "x"}, "seed must be a whole number >= 0, got 'x'"),
    "seed=-1": ({"seed": -1}, "seed must be a whole number >= 0, got -1"),
    "seed=True": ({"seed": True}, "seed must be a whole number"),
    "threads=2.0": ({"threads": 2.0}, "threads must be a whole number"),
    "verify='no'": ({"verify": "no"}, "verify must be True or False, got 'no'"),
    "fix_shapes=[1,2]": ({"fix_shapes": [1, 2]}, "fix_shapes must be a mapping {input name: [sizes]}, got [1, 2]"),
    "fix_shapes zero": ({"fix_shapes": {"input": [1, 0, 8, 8]}}, "must be positive sizes"),
    "fix_shapes str": ({"fix_shapes": {"input": "1x1x8x8"}}, "must be a list of sizes"),
    "fix_shapes huge": ({"fix_shapes": {"input": [10**6, 10**6]}}, "1e+12 elements"),
    "preprocess=3": ({"preprocess": 3}, "preprocess must be an ImagePreprocess or a mapping"),
    "model=42": ({"model": 42}, "model must be a path, bytes, an onnx.ModelProto or an edgegraph Model, got int"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_library_arguments_raise_edgegraph_error(case):
    given, phrase = BAD_CALLS[case]
    kwargs = {"model": DIGITS, "passes": "test-record"} | given
    with pytest.raises(EdgegraphError) as raised:
        edgegraph.optimize(kwargs.pop("model"), kwargs.pop("passes"), **kwargs)
    assert phrase in str(raised.value)
    assert len(str(raised.value)) < 300
    assert Record.seen == []  # refused before any pass ran


def test_passes_as_a_mapping_keep_their_options():
    quant, record = edgegraph.parse_passes({"quant": {"method": "entropy"}, "test-record": None})
    assert (quant.name, quant.method) == ("quant", "entropy")
    assert record.name == "test-record"
    mixed = edgegraph.parse_passes(["test-record(label=a)", {"test-record": {"label": "b"}}, Record(label="c")])
    assert [p.label for p in mixed] == ["a", "b", "c"]
    edgegraph.optimize(DIGITS, {"test-record": {"label": "from a mapping"}}, verify=False)
    assert [label for label, _ in Record.seen] == ["from a mapping"]


def test_make_context_takes_a_target_profile_and_timing():
    model = edgegraph.load(DIGITS)
    ctx = edgegraph.make_context(model, target=edgegraph.load_target("cpu"), timing=False,
                                 calib={"input": np.zeros((2, 1, 16, 16), np.float32)})
    assert ctx.target.name == "cpu" and ctx.timing is False and len(ctx.calibration) == 2
