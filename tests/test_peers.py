"""benchmarks/peers.py: the harness that times Meta's DINOv2 code and lightly next to raddino (run on CPU, tiny ViT)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "peers.py"
# where the brief's CPU check installs the peer wheels (pip install --target ... --no-deps); optional
PEERS_SITE = os.environ.get("RADDINO_PEERS_SITE", "/work/exp/peers_site")


def _importable(pkg: str, extra_path: str) -> bool:
    if importlib.util.find_spec(pkg) is not None:
        return True
    return (Path(extra_path) / pkg / "__init__.py").is_file()


def _run(tmp_path: Path, *args: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([extra_path] if extra_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cpu_smoke_times_both_peers(tmp_path):
    if not (_importable("dinov2", PEERS_SITE) and _importable("lightly", PEERS_SITE)):
        pytest.skip("peer packages (dinov2, lightly) not installed; benchmarks/fetch_gpu_wheels.sh")
    proc = _run(
        tmp_path, "--cpu-smoke", "--steps", "1", "--warmup", "1", "--peers", "dinov2", "lightly", extra_path=PEERS_SITE
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "peers.json").read_text())
    assert result["cpu_smoke"] and result["device"].startswith("cpu")
    assert set(result["peers"]) == {"dinov2", "lightly"}
    for name, rec in result["peers"].items():
        assert rec["status"] == "ok", (name, rec)
        assert rec["images_per_s"] > 0 and rec["step_ms_median"] > 0
        assert rec["last_losses"] and all(math.isfinite(v) for v in rec["last_losses"].values()), rec
        assert rec["masked_patches"] > 0
    assert "raddino bench train" in (tmp_path / "peers.md").read_text()


def test_sdpa_attention_matches_metas_fallback(monkeypatch):
    """dinov2-sdpa swaps only the attention kernel: same parameters, same output as Meta's softmax(q k^T) v."""
    if not _importable("dinov2", PEERS_SITE):
        pytest.skip("peer packages (dinov2, lightly) not installed; benchmarks/fetch_gpu_wheels.sh")
    import torch

    monkeypatch.syspath_prepend(PEERS_SITE)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import peers
    from dinov2.layers.attention import MemEffAttention

    torch.manual_seed(0)
    ref = MemEffAttention(64, num_heads=4, qkv_bias=True)
    x = torch.randn(3, 17, 64)
    expected = ref(x)
    ref.__class__ = peers._sdpa_attention_class()
    torch.testing.assert_close(ref(x), expected, rtol=1e-5, atol=1e-5)


def test_missing_peer_package_is_skipped_not_a_traceback(tmp_path):
    proc = _run(
        tmp_path,
        "--cpu-smoke",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--peers",
        "dinov2",
        "lightly",
        "--pretend-missing",
        "dinov2",
        "lightly",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "dinov2: skipped, package(s) not installed: dinov2" in proc.stdout
    result = json.loads((tmp_path / "peers.json").read_text())
    assert {r["status"] for r in result["peers"].values()} == {"skipped"}
    assert "skipped" in (tmp_path / "peers.md").read_text()


def test_unknown_peer_is_a_usage_error(tmp_path):
    proc = _run(tmp_path, "--cpu-smoke", "--peers", "nope")
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr
