"""The cleanup passes: what each rewrites (op lists after), that onnxruntime outputs stay the same,
that a second run finds nothing to do, determinism, and `cleanup` on every real model."""

from __future__ import annotations

import logging
import numpy as np
import onnx
import pytest
from conftest import model_id, shared_model_paths

import edgegraph
from edgegraph import modelio, runtime
from edgegraph.context import CalibrationData, PassContext, VerifyConfig
from edgegraph.errors import PassOptionError
from edgegraph.registry import get_pass
from edgegraph.spec import parse
from fixtures import cleanup as fx


def ops(model: onnx.ModelProto) -> list[str]:
    """Top-level op types, sorted (the order of independent nodes is not the point)."""
    return sorted(n.op_type for n in model.graph.node)


def feeds_for(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    specs = runtime.input_specs(model)
    count = runtime.batch_size_for(specs, batch)
    batch = next(CalibrationData.random(specs, count, seed=seed, dynamic_dim=3).batches(count))
    return runtime.adapt_feeds(specs, batch)


def assert_same_outputs(original: onnx.ModelProto, new: onnx.ModelProto, feeds=None, rtol=1e-5, atol=1e-6,
                        threads: int = 1):
    feeds = feeds if feeds is not None else feeds_for(original)
    want = runtime.run(runtime.session(original, threads=threads), feeds)
    got = runtime.run(runtime.session(new, threads=threads), feeds)
    assert list(got) == list(want), "graph outputs (names, order) changed"
    for name, expected in want.items():
        actual = got[name]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                                   rtol=0, atol=atol + rtol * scale, err_msg=name)


def apply(model: onnx.ModelProto, spec: str) -> onnx.ModelProto:
    return edgegraph.optimize(model, spec, verify=False)


def run_pass(model: onnx.ModelProto, spec: str):
    """The PassResult of running `spec` (one pass) directly on `model`."""
    (p,) = parse(spec)
    return p.run(modelio.load(model), PassContext(progress=False))


# spec, fixture, op types after (sorted)
CASES = [
    ("fold-constants", fx.constant_subgraph, ["Add"]),
    ("fold-constants", fx.static_shape_arithmetic, ["Mul", "ReduceSum", "Reshape", "Unsqueeze"]),
    # Int8 weights stay encoded, however small and whatever growth is allowed (analysis.encoding).
    ("fold-constants", fx.bloating_constants, ["Add", "Cast", "Cast", "Expand", "MatMul", "MatMul", "Mul"]),
    ("fold-constants(growth_limit=100000000)", fx.bloating_constants, ["Add", "Cast", "Cast", "MatMul", "MatMul", "Mul"]),
    ("fold-constants", fx.constant_if, ["Add", "Relu"]),
    ("fold-constants", fx.constant_output, ["Constant", "Relu"]),
    ("remove-identity", fx.no_ops, ["Relu"]),
    ("simplify-shapes", fx.layout_chains, ["Cast", "Concat", "ReduceMean", "Reshape", "Slice", "Transpose"]),
    ("simplify-shapes", fx.dynamic_reshape, ["Reshape"]),
    ("simplify-shapes", fx.transpose_round_trip, ["Mul", "Mul", "Pow", "Sigmoid", "Slice", "Slice", "Sub"]),
    ("fold-batchnorm", fx.conv_batchnorm, ["Add", "Conv", "Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Reshape"]),
    ("fuse-linear", fx.linear_fusions, ["Conv", "ConvTranspose", "Gemm", "Mul", "Reshape"]),
    ("cse", fx.duplicates, ["Add", "Add", "Dropout", "MatMul", "Mul", "RandomUniformLike", "RandomUniformLike",
                            "Relu", "Relu", "Sub"]),
    ("eliminate-dead", fx.duplicates, ["Add", "Add", "Dropout", "MatMul", "MatMul", "Mul", "RandomUniformLike",
                                       "RandomUniformLike", "Relu", "Relu", "Relu", "Sub"]),
    ("cleanup", fx.static_shape_arithmetic, ["Mul", "ReduceSum", "Reshape"]),
    ("cleanup", fx.conv_batchnorm, ["Conv", "Conv", "ConvTranspose", "Gemm", "Gemm", "Relu", "Reshape"]),
    ("cleanup", fx.linear_fusions, ["Conv", "ConvTranspose", "Gemm", "Mul", "Reshape"]),
    ("cleanup", fx.duplicates, ["Add", "Add", "MatMul", "Mul", "RandomUniformLike", "RandomUniformLike", "Relu",
                                "Relu", "Sub"]),
]
CASE_IDS = [f"{spec.split('(')[0]}-{build.__name__}" + ("-option" if "(" in spec else "") for spec, build, _ in CASES]


@pytest.mark.parametrize(("spec", "build", "expected"), CASES, ids=CASE_IDS)
def test_rewrites_and_keeps_outputs(spec, build, expected):
    model = build()
    result = apply(model, spec)
    assert ops(result) == expected
    assert_same_outputs(model, result)
    assert [o.name for o in result.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in result.graph.input] == [i.name for i in model.graph.input]
    assert result.opset_import == model.opset_import


@pytest.mark.parametrize(("spec", "build", "expected"), CASES, ids=CASE_IDS)
def test_second_run_finds_nothing(spec, build, expected):
    once = apply(build(), spec)
    assert not run_pass(once, spec).modified


@pytest.mark.parametrize(("spec", "build"), [("cleanup", fx.layout_chains), ("cleanup", fx.conv_batchnorm),
                                              ("cleanup", fx.duplicates), ("cleanup", fx.subgraph_and_function)])
def test_deterministic(spec, build):
    assert apply(build(), spec).SerializeToString() == apply(build(), spec).SerializeToString()


@pytest.mark.parametrize("spec", ["fold-constants", "remove-identity", "simplify-shapes", "fold-batchnorm",
                                  "fuse-linear", "dedup-initializers", "cse", "eliminate-dead", "cleanup"])
def test_nothing_to_do_reports_unmodified(spec):
    # A model with no constants to fold, no no-ops, nothing to merge: every pass leaves it alone.
    model = fx.make([onnx.helper.make_node("Relu", ["x"], ["y"])], [("x", onnx.TensorProto.FLOAT, [2])],
                    [("y", onnx.TensorProto.FLOAT, [2])])
    result = run_pass(model, spec)
    assert not result.modified
    assert ops(apply(model, spec)) == ["Relu"]


# --- details of single rewrites ----------------------------------------------------------------


def test_fold_constants_leaves_random_and_custom_domain_ops():
    model = fx.untouchable_constants()
    assert not run_pass(model, "fold-constants").modified
    assert ops(apply(model, "cleanup")) == sorted(n.op_type for n in model.graph.node)


def test_fold_constants_respects_size_limit():
    model = fx.bloating_constants()
    folded = apply(model, "fold-constants(growth_limit=100000000, size_limit=1000)")
    assert "Expand" in ops(folded) and "Cast" in ops(folded)  # both results exceed 1000 bytes
    assert_same_outputs(model, folded)


def test_fold_constants_keeps_constant_graph_output():
    result = apply(fx.constant_output(), "cleanup")
    assert [o.name for o in result.graph.output] == ["y", "c"]
    constant = next(n for n in result.graph.node if n.op_type == "Constant")
    assert list(constant.output) == ["c"]


def test_remove_identity_keeps_what_is_needed():
    model = fx.needed_ops()
    assert not run_pass(model, "remove-identity").modified
    assert ops(apply(model, "cleanup")) == ["Add", "Cast", "Identity", "Slice"]


def test_reshape_target_trusts_named_dims_only():
    named = apply(fx.reshape_like_other(("batch", "seq")), "simplify-shapes")
    assert ops(named) == ["Reshape"]
    target = onnx.numpy_helper.to_array(next(t for t in named.graph.initializer if t.name.endswith("_shape")))
    assert target.tolist() == [0, 0, 4, 8]
    # "?" is what some exporters write for every unknown dim: x and y may differ, and do here.
    model = fx.reshape_like_other(("?", "?"))
    result = apply(model, "cleanup")
    assert "Concat" in ops(result)
    feeds = {"x": np.ones((2, 3, 32), np.float32), "y": np.ones((3, 2), np.float32)}
    assert_same_outputs(model, result, feeds)


def test_transposes_stay_when_the_data_escapes_their_region():
    model = fx.transpose_round_trip(escape=True)
    assert not run_pass(model, "simplify-shapes").modified
    assert ops(apply(model, "cleanup")).count("Transpose") == 2


def test_batchnorm_in_float16_is_left_alone():
    model = fx.conv_batchnorm_fp16()
    assert not run_pass(model, "fold-batchnorm").modified
    result = apply(model, "cleanup")
    assert ops(result) == ["BatchNormalization", "Conv", "Relu"]
    assert_same_outputs(model, result, rtol=1e-3, atol=1e-3)


def test_batchnorm_stats_count_folds_per_op():
    stats = run_pass(fx.conv_batchnorm(), "fold-batchnorm").stats
    assert stats == {"Add": 1, "Conv": 2, "ConvTranspose": 1, "Gemm": 1}


def test_dedup_initializers_shares_equal_weights():
    model = fx.duplicates()
    result = run_pass(model, "dedup-initializers")
    assert result.stats == {"initializers": 1}
    cleaned = apply(model, "dedup-initializers")
    matmul_weights = {n.input[1] for n in cleaned.graph.node if n.op_type == "MatMul"}
    assert len(matmul_weights) == 1
    assert_same_outputs(model, cleaned)


def test_eliminate_dead_drops_unused_initializer_and_mask():
    cleaned = apply(fx.duplicates(), "eliminate-dead")
    assert "unused_w" not in {t.name for t in cleaned.graph.initializer}
    dropout = next(n for n in cleaned.graph.node if n.op_type == "Dropout")
    assert list(dropout.output) == ["y_drop"]


def test_subgraphs_and_functions_are_cleaned():
    model = fx.subgraph_and_function()
    result = apply(model, "cleanup")
    assert ops(result) == ["Loop", "Scale2"]
    body = next(n for n in result.graph.node if n.op_type == "Loop").attribute[0].g
    assert sorted(n.op_type for n in body.node) == ["Add", "Identity"]  # the Identity writes the body output
    assert sorted(n.op_type for n in result.functions[0].node) == ["Constant", "Mul"]
    assert_same_outputs(model, result)


def test_cleanup_stats_and_options():
    result = run_pass(fx.conv_batchnorm(), "cleanup")
    assert result.stats["fold-batchnorm"] == 5 and result.stats["fuse-linear"] == 1
    assert result.stats["nodes_before"] == 13 and result.stats["nodes_after"] == 7
    assert result.details["fold-batchnorm"] == {"Add": 1, "Conv": 2, "ConvTranspose": 1, "Gemm": 1}
    skipped = apply(fx.conv_batchnorm(), "cleanup(skip=[fold-batchnorm])")
    assert ops(skipped).count("BatchNormalization") == 5
    with pytest.raises(PassOptionError, match="cannot skip"):
        parse("cleanup(skip=[nonsense])")
    with pytest.raises(PassOptionError):
        get_pass("fold-constants")(size_limit=-1)


def test_cleanup_verifies_in_the_pipeline():
    # The pipeline's own verification (run in ORT after each pass) holds for exact passes.
    model = fx.linear_fusions()
    result = edgegraph.optimize(model, "cleanup", verify=True)
    assert ops(result) == ["Conv", "ConvTranspose", "Gemm", "Mul", "Reshape"]


def test_every_cleanup_pass_is_registered_and_exact():
    names = {"cleanup", "fold-constants", "remove-identity", "simplify-shapes", "fold-batchnorm", "fuse-linear",
             "dedup-initializers", "cse", "eliminate-dead"}
    for name in names:
        cls = get_pass(name)
        assert cls.exact and cls.summary and cls.__doc__ and not cls.needs


# --- real models -------------------------------------------------------------------------------


SHARED = shared_model_paths()


@pytest.mark.skipif(not SHARED, reason="../shared/models not found: the real models live next to the repo")
@pytest.mark.parametrize("path", SHARED, ids=model_id)
def test_cleanup_on_real_model(path):
    logging.disable(logging.WARNING)
    try:
        model = onnx.load(str(path))
        reference = path.with_name(path.stem + ".reference_io.npz")
        specs = runtime.input_specs(model)
        if reference.exists():
            data = CalibrationData.from_npz(reference, [s.name for s in specs])
            feeds = runtime.adapt_feeds(specs, next(data.batches(len(data))))
        else:
            feeds = feeds_for(model, batch=1)
        (p,) = parse("cleanup")
        loaded = modelio.load(model)
        before = sum(len(g.nodes) for g in [loaded.graph])
        cleaned = edgegraph.optimize(model, [p], verify=False)
    finally:
        logging.disable(logging.NOTSET)
    assert len(cleaned.graph.node) <= before
    tolerance = VerifyConfig()
    assert_same_outputs(model, cleaned, feeds, rtol=tolerance.rtol, atol=tolerance.atol, threads=0)
    assert cleaned.opset_import == model.opset_import
    assert [o.name for o in cleaned.graph.output] == [o.name for o in model.graph.output]
    # (Initializers that old IR versions also list as inputs are weights, not inputs, to edgegraph.)
    assert runtime.input_specs(cleaned) == runtime.input_specs(model)
