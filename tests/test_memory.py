"""The CUDA libraries' pages are released on a host without a GPU, and torch keeps working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, torch
from server.memory import cuda_library_mappings, cuda_library_rss, release_cuda_libraries
before, droppable = cuda_library_rss(), sum(m.rss for m in cuda_library_mappings() if m.droppable)
released = release_cuda_libraries()
after = sum(m.rss for m in cuda_library_mappings() if m.droppable)
x = torch.randn(64, 64)
ok = bool(torch.allclose((x @ x.T).diagonal(), (x * x).sum(1), rtol=1e-4, atol=1e-4))
print(json.dumps({"before": before, "droppable": droppable, "released": released, "after": after, "ok": ok}))
"""


def test_cuda_library_pages_are_released_without_a_gpu():
    assert not torch.cuda.is_available()  # this suite runs on CPU hosts; a GPU host keeps its libraries
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    # the pinned torch is PyPI's CUDA build: importing it faults in its CUDA libraries
    assert m["droppable"] > 50 * 2**20, m
    assert m["after"] < 0.05 * m["droppable"], m  # dropped, and not faulted back by the matmul
    assert m["released"] >= 0.9 * m["droppable"], m
    assert m["ok"]


def test_the_mapping_filter_picks_cuda_libraries_only(tmp_path):
    from server.memory import cuda_library_mappings, cuda_library_rss

    smaps = tmp_path / "smaps"
    smaps.write_text(
        "7f0000000000-7f0000100000 r-xp 00000000 fd:01 1 /venv/site-packages/nvidia/cu13/lib/libcublasLt.so.13\n"
        "Rss:                1024 kB\nAnonymous:             0 kB\n"
        "7f0000100000-7f0000200000 r--p 00000000 fd:01 2 /venv/site-packages/torch/lib/libtorch_cuda.so\n"
        "Rss:                 512 kB\nAnonymous:           256 kB\n"
        "7f0000200000-7f0000300000 rw-p 00000000 fd:01 2 /venv/site-packages/torch/lib/libtorch_cuda.so\n"
        "Rss:                  64 kB\nAnonymous:             0 kB\n"
        "7f0000300000-7f0000400000 r-xp 00000000 fd:01 3 /venv/site-packages/torch/lib/libtorch_cpu.so\n"
        "Rss:                2048 kB\nAnonymous:             0 kB\n"
        "7f0000400000-7f0000500000 rw-p 00000000 00:00 0 \n"
        "Rss:                4096 kB\nAnonymous:          4096 kB\n"
    )
    maps = cuda_library_mappings(str(smaps))
    assert [(m.start, m.rss, m.droppable) for m in maps] == [
        (0x7F0000000000, 1024 << 10, True), (0x7F0000100000, 512 << 10, False), (0x7F0000200000, 64 << 10, False)]
    assert cuda_library_rss(str(smaps)) == (1024 + 512 + 64) * 1024
    assert cuda_library_rss(str(tmp_path / "absent")) == 0
