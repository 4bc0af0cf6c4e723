from __future__ import annotations

from pathlib import Path

import pytest

import raddino  # noqa: F401  (registers the torchvision shim before any test imports timm)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the repository; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture
def pneumoniamnist(shared_data: Path) -> Path:
    path = shared_data / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path
