"""Every test file is collected, or skipped at collection with a reason: pytest's default norecursedirs once
skipped tests/build without a word."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_every_test_file_is_collected():
    everything = "slow or gpu or not (slow or gpu)"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs", "-m", everything],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    collected = {line.split("::")[0] for line in lines if "::" in line}
    # a module that skips itself at import (optional dependency missing) says so: "SKIPPED [1] path:line: why"
    skipped = {line.split()[2].split(":")[0] for line in lines if line.startswith("SKIPPED [")}
    on_disk = {p.relative_to(TESTS.parent).as_posix() for p in TESTS.rglob("test_*.py")}
    assert on_disk - collected - skipped == set()
    assert len(on_disk) > 40  # the walk itself found the suite
