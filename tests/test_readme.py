"""The README's shell commands, run as written (from a scratch copy of the bundled fixtures), so
that the documented usage cannot rot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import DEFAULT_DIR, REPO
from edgegraph import runtime

# Installing is what the test environment already did (`pip install -e .`), and the README's
# "run the tests" line would run this suite inside itself: both are left out, and said so here.
ALREADY_DONE = (re.compile(r"^pip install -e "), re.compile(r"^pytest\b"))


def readme_commands() -> list[str]:
    """Every command of the README's ```bash blocks, split at `&&`, minus ALREADY_DONE."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            for command in (c.strip() for c in line.split("&&")):
                if command and not any(p.match(command) for p in ALREADY_DONE):
                    commands.append(command)
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_run():
    assert any(c.startswith("edgegraph opt ") for c in COMMANDS)
    assert len(COMMANDS) >= 5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch folder laid out like the checkout for what the commands read."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(DEFAULT_DIR, root / "fixtures" / "default")
    return root


def test_readme_commands_run_in_order(workdir):
    # In the README's order: `bench` reads the model the `opt` line before it wrote.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for command in COMMANDS:
        done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        for output in re.findall(r"(?:-o|--report)\s+(\S+)", command):
            assert (workdir / output).is_file(), output
        model_out = re.search(r"-o\s+(\S+\.onnx)", command)
        if model_out:  # what the README produces must be valid and agree with the float model
            assert top1_agreement(workdir / model_out.group(1)) >= AGREEMENT


# Top-1 agreement of the README's int8 digits model with the float one on 200 held-out samples:
# measured 1.0 (both commands); a broken quantizer lands far below.
AGREEMENT = 0.98


def top1_agreement(path: Path) -> float:
    quantized = onnx.load(path)
    onnx.checker.check_model(quantized)
    data = np.load(DEFAULT_DIR / "digits_eval.npz")
    feeds = {"input": data["input"][:200]}
    want = runtime.run(runtime.session(onnx.load(DEFAULT_DIR / "digits_cnn.onnx")), feeds)
    got = runtime.run(runtime.session(quantized, optimize=True), feeds)
    return float(np.mean([np.mean(np.argmax(got[k], -1) == np.argmax(want[k], -1)) for k in want]))
