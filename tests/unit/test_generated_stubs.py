"""The committed Python stubs match protos/: regenerating them changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_committed_stubs_are_up_to_date(tmp_path: Path) -> None:
    """Editing a .proto without `make proto` fails here, naming the stale files."""
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "gen_python.py"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    committed = ROOT / "client" / "_proto"
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.py*")}
    current = {
        p.relative_to(committed): p.read_text()
        for p in committed.rglob("*.py*")
        if "__pycache__" not in p.parts
    }
    stale = sorted(
        str(name) for name in fresh.keys() | current.keys() if fresh.get(name) != current.get(name)
    )
    assert not stale, f"stale generated stubs, run `make proto`: {stale}"
