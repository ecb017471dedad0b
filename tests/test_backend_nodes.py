"""`cleanup` on every ONNX backend node test case: whatever onnxruntime runs and gets right before
must run and stay right after (opsets 1-23, every op, optional/sequence types, subgraphs).

The cases come from `onnx.backend.test.case.node.collect_testcases` (models plus expected
outputs computed by onnx's reference implementation). One batched test keeps it fast; a failure
lists every case that broke and why.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

import edgegraph

# Cases edgegraph.ir cannot load and save (optional-typed values and TypeProto attributes now can).
KNOWN_IR_UNSUPPORTED: set[str] = set()

# Expected outputs are compared the way onnx's backend runner does.
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7


def _session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model, inputs):
    sess = _session(model)
    names = [i.name for i in sess.get_inputs()]
    feeds = {name: value for name, value in zip(names, inputs)}
    return sess.run(None, feeds)


def _close(expected, actual, rtol, atol) -> bool:
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(
            _close(e, a, rtol, atol) for e, a in zip(expected, actual))
    if expected is None:
        return actual is None
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        return False
    if expected.dtype.kind in "fc":
        return bool(np.allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol,
                                equal_nan=True))
    if expected.dtype.kind in "OUS":
        return expected.tolist() == actual.tolist()
    return bool(np.array_equal(expected, actual))


def _round_trips(model) -> bool:
    """Whether edgegraph's own load -> save works on the model (no pass involved)."""
    try:
        edgegraph.load(model).to_proto()
        return True
    except Exception:  # noqa: BLE001
        return False


def _passes(model, case) -> bool:
    for inputs, expected in case.data_sets:
        outputs = _run(model, inputs)
        if len(outputs) != len(expected):
            return False
        rtol = case.rtol if case.rtol is not None else DEFAULT_RTOL
        atol = case.atol if case.atol is not None else DEFAULT_ATOL
        if not all(_close(e, a, rtol, atol) for e, a in zip(expected, outputs)):
            return False
    return True


@pytest.fixture(scope="module")
def node_cases(backend_node_cases):
    return backend_node_cases


def test_cleanup_keeps_every_backend_node_case_passing(node_cases, record_property, capsys):
    logging.disable(logging.WARNING)
    try:
        ort_passing, broken, unsupported = 0, [], []
        for case in node_cases:
            try:
                if not _passes(case.model, case):
                    continue
            except Exception:  # noqa: BLE001 - onnxruntime cannot run this case as-is: not ours to keep
                continue
            ort_passing += 1
            try:
                cleaned = edgegraph.optimize(case.model, "cleanup", verify=False)
            except Exception as exc:  # noqa: BLE001
                if not _round_trips(case.model):
                    unsupported.append(case.name)  # edgegraph cannot even load/save it: not cleanup's doing
                else:
                    broken.append(f"{case.name}: cleanup raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            try:
                if not _passes(cleaned, case):
                    broken.append(f"{case.name}: outputs no longer match the expected values")
            except Exception as exc:  # noqa: BLE001
                broken.append(f"{case.name}: cleaned model does not run: {str(exc).splitlines()[0][:200]}")
    finally:
        logging.disable(logging.NOTSET)
    summary = (f"backend node cases: {len(node_cases)}, onnxruntime passes {ort_passing}, "
               f"still passing after cleanup {ort_passing - len(broken) - len(unsupported)}, "
               f"broken by cleanup {len(broken)}, not loadable by edgegraph.ir {len(unsupported)}"
               + (f" ({', '.join(unsupported)})" if unsupported else ""))
    record_property("summary", summary)
    with capsys.disabled():
        print(f"\n{summary}")
    assert not broken, f"{len(broken)} case(s) broken by cleanup:\n" + "\n".join(broken)
    # Anything that cannot round-trip would be a new regression.
    assert set(unsupported) <= KNOWN_IR_UNSUPPORTED, f"new round-trip failures: {set(unsupported) - KNOWN_IR_UNSUPPORTED}"
