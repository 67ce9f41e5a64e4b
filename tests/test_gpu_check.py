"""scripts/gpu_check.py, the one-run check of the CUDA path, run here on the CPU at tiny dimensions so that it
cannot rot between the sessions that have a GPU."""

import importlib.util
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def test_the_gpu_check_runs_on_the_cpu_at_tiny_dims(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu.json"
    result = gpu_check.main(["--device", "cpu", "--dims", "tiny", "--steps", "3", "--json", str(out)])
    assert out.read_text().startswith("{")
    assert result["golden"]["ok"] and result["golden"]["max_abs_err"] < 1e-4
    assert result["batched_equals_sequential"]["ok"]
    speed = result["speed"]
    for batch in ("batch1", "batch16"):
        assert speed[batch]["logits_finite"] and speed[batch]["tok_s"] > 0
    assert speed["weight_bytes"] > 0 and math.isfinite(speed["batch1_pct_roofline"])
    assert result["ok"]
