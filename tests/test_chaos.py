"""The chaos script survives SIGKILLs at random moments (K = 3 here; `python tests/chaos/chaos.py` runs 20)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHAOS = Path(__file__).resolve().parent / "chaos" / "chaos.py"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chaos_three_kills_survived(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(CHAOS), "--kills", "3", "--seed", "7", "--out", str(run)],
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "survived 3/3" in done.stdout
    assert (run / "checkpoints").is_dir() and not list((run / "checkpoints").glob(".tmp-*"))


def test_chaos_counts_no_survival_it_did_not_see(tmp_path):
    """A run that ends before its kill was never killed: reported as a problem, exit 1, not counted survived."""
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(CHAOS), "--kills", "1", "--steps", "5", "--min-wait", "30", "--max-wait", "30"]
        + ["--out", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "survived 0/1" in done.stdout and "problem:" in done.stdout
