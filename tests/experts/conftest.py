"""Fixtures for the experts tests: the project's test photos, and real assets that must be present.

Tests that need the converted detector or Tesseract FAIL (never skip) when they are missing: a skipped test
cannot stand in for a feature. `scripts/setup-experts.sh` prepares both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from experts.assets import SETUP_HINT, centernet_path

IMAGES = Path(__file__).resolve().parents[1] / "data" / "images"


def load_image(name: str) -> Image.Image:
    image = Image.open(IMAGES / name)
    image.load()
    return image


@pytest.fixture(scope="session")
def centernet_file() -> Path:
    path = centernet_path()
    if not path.is_file():
        pytest.fail(f"the converted CenterNet detector is missing at {path}: {SETUP_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def tesseract_binary() -> str:
    binary = shutil.which("tesseract")
    if binary is None:
        pytest.fail(f"the tesseract binary is not installed: {SETUP_HINT}", pytrace=False)
    return binary
