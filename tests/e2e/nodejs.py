"""Runs the Node.js programs of tests/node, whose packages `make tools` installs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

NODE_PROJECT = ROOT / "tests" / "node"
NODE_MODULES = NODE_PROJECT / "node_modules"


def node_binary() -> str:
    """The `node` on PATH; fails the test (not skips it) when it or the packages are missing."""
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is missing: install Node.js 20+ (Debian's npm package brings it)")
    if not (NODE_MODULES / "@grpc" / "grpc-js").is_dir():
        pytest.fail("tests/node/node_modules is missing: run `make tools` (make test does it)")
    return found


def run_node(script: Path, *args: str, timeout_s: float = 40.0) -> subprocess.CompletedProcess[str]:
    """`node SCRIPT ARGS…`; the scripts bound their own calls, timeout_s is a backstop."""
    return subprocess.run(
        [node_binary(), str(script), *args],
        cwd=NODE_PROJECT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
