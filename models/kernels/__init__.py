"""Optional CPU kernels, built on first use with the machine's C++ compiler and cached.

`gemv_bf16`: a batch-1 bf16 matrix-vector product for CPUs with AVX512-BF16 (see gemv_bf16.cpp) — about 2x
faster than oneDNN's on this project's 2-core CPU, where batch-1 decode is bound by streaming the weights.
`available()` builds it once (torch.utils.cpp_extension, cached under $LAMINA_KERNEL_DIR or
~/.cache/lamina/kernels) and says whether it can be used; without a compiler, or on a CPU without AVX512-BF16,
it is False and the model keeps oneDNN. The op is a real torch op (`torch.ops.lamina.gemv_bf16`) with a fake
implementation, so torch.compile traces it.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("lamina.kernels")
SOURCE = Path(__file__).with_name("gemv_bf16.cpp")


def _cpu_has_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@cache
def available() -> bool:
    """Builds and loads the kernel once; False (with the reason logged) where it cannot run here."""
    if os.environ.get("LAMINA_KERNELS", "1") == "0":
        return False
    if not _cpu_has_bf16():
        return False
    try:
        from torch.utils.cpp_extension import load

        build = Path(os.environ.get("LAMINA_KERNEL_DIR", Path.home() / ".cache" / "lamina" / "kernels"))
        build = build / f"torch-{torch.__version__}"
        build.mkdir(parents=True, exist_ok=True)
        # -fopenmp: at::parallel_for is inline, and single-threaded, without it (libgomp.so.1 resolves to torch's)
        load(name="lamina_gemv_bf16", sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
             extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no headers, ...: oneDNN stays in use
        log.warning("bf16 GEMV kernel unavailable, using oneDNN: %s", str(e).strip().splitlines()[-1][:300])
        return False

    @torch.library.register_fake("lamina::gemv_bf16")
    def _(x: Tensor, packed: Tensor) -> Tensor:
        return x.new_empty((*x.shape[:-1], packed.shape[0] * 16))

    return True


def pack(weight: Tensor) -> Tensor | None:
    """The kernel's layout of a (N, K) bf16 weight — (N/16, K/2, 16, 2), a copy — or None where unusable."""
    N, K = weight.shape
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or N % 16 or K % 2 or not available():
        return None
    return weight.detach().reshape(N // 16, 16, K // 2, 2).permute(0, 2, 1, 3).contiguous()


def gemv(x: Tensor, packed: Tensor) -> Tensor:
    return torch.ops.lamina.gemv_bf16(x, packed)
