"""The experts package stays on its side of the architecture: no server/models imports, a light import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import experts

PACKAGE = Path(experts.__file__).parent


def test_experts_never_import_server_or_models():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("server", "models"), f"{path.name} imports {name}"


def test_importing_experts_loads_no_heavy_or_http_library():
    code = (
        "import sys, experts, experts.detection, experts.ocr, experts.caption\n"
        "heavy = {'torch', 'onnxruntime', 'onnx', 'easyocr', 'rapidocr', 'fastapi', 'server', 'models'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
