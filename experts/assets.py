"""Where prepared model files live, and the error a user sees when one is missing.

Files that do not ship inside a Python package (the converted CenterNet detector) are prepared once by
`scripts/setup-experts.sh` into a data dir: `$LAMINA_DATA_DIR`, else `$XDG_CACHE_HOME/lamina`, else
`~/.cache/lamina`. Nothing here downloads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from experts.base import MissingAssetError

SETUP_HINT = "run `scripts/setup-experts.sh` (as root on Debian; it installs Tesseract and converts the detector)"
CENTERNET_FILE = "experts/centernet-mobilenetv3.onnx"


def data_dir() -> Path:
    """The directory prepared assets are read from (not created here)."""
    if explicit := os.environ.get("LAMINA_DATA_DIR"):
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "lamina"


def centernet_path() -> Path:
    return data_dir() / CENTERNET_FILE


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return `path` if it exists, else raise MissingAssetError naming `what` and how to prepare it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingAssetError(f"{what} not found at {p}: {SETUP_HINT}, or set LAMINA_DATA_DIR")
    return p
