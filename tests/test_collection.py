"""Every test file is collected: pytest's default norecursedirs once skipped tests/build without a word."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_every_test_file_is_collected():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow or gpu or not (slow or gpu)"],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    on_disk = {p.relative_to(TESTS.parent).as_posix() for p in TESTS.rglob("test_*.py")}
    assert on_disk - collected == set()
    assert len(on_disk) > 40  # the walk itself found the suite
