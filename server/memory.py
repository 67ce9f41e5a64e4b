"""Resident memory the process does not need: the CUDA libraries on a host without a GPU.

PyPI's Linux torch wheels are CUDA builds: `import torch` loads libtorch_cuda, cuBLAS(Lt), nvrtc, nvJitLink,
cuDNN, NCCL … and their static initialisers fault in 150-300 MB of their pages (how much depends on the page
cache), code that can never run without a GPU. `release_cuda_libraries` drops those pages from this process's
page tables (madvise MADV_DONTNEED) in the libraries' read-only mappings that hold no private (copied-on-write)
page: there every page is the file's own, so anything touched later faults back in unchanged from the page
cache — safe even if some of that code runs after all. Writable mappings and relocated read-only ones are left
as they are.
"""

from __future__ import annotations

import ctypes
import logging
import re
import sys
from dataclasses import dataclass

log = logging.getLogger("lamina.memory")

MADV_DONTNEED = 4
# the mappings of CUDA-only libraries: NVIDIA's wheels (nvidia/*, cuda-bindings) and torch's CUDA parts
_CUDA_LIBRARY = re.compile(r"/(nvidia|cuda)/|/lib(torch_cuda|c10_cuda|torch_nvshmem|caffe2_nvrtc)[^/]*\.so")
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    rss: int  # bytes
    anonymous: int  # bytes of private (copied-on-write) pages

    @property
    def droppable(self) -> bool:
        """Read-only and every resident page the file's own: dropping it loses nothing."""
        return "w" not in self.perms and self.anonymous == 0


def cuda_library_mappings(smaps: str = "/proc/self/smaps") -> list[Mapping]:
    """This process's mappings of CUDA-only libraries (none where /proc is absent)."""
    out: list[Mapping] = []
    head, fields = None, {}
    try:
        with open(smaps) as f:
            lines = list(f)
    except OSError:
        return out
    for line in lines + ["0-0 ---p 0 0 0 <end>"]:
        m = _MAPPING.match(line)
        if m is None:
            key, _, value = line.partition(":")
            if key in ("Rss", "Anonymous"):
                fields[key] = int(value.split()[0]) * 1024
            continue
        if head is not None:
            out.append(Mapping(head[0], head[1], head[2], fields.get("Rss", 0), fields.get("Anonymous", 0)))
        head, fields = None, {}
        if _CUDA_LIBRARY.search(m.group(4)):
            head = (int(m.group(1), 16), int(m.group(2), 16), m.group(3))
    return out


def cuda_library_rss(smaps: str = "/proc/self/smaps") -> int:
    """Bytes of this process's resident memory that map CUDA-only libraries."""
    return sum(m.rss for m in cuda_library_mappings(smaps))


def release_cuda_libraries() -> int:
    """On Linux, when torch sees no CUDA device, drops the CUDA libraries' droppable resident pages. Returns
    the bytes released."""
    import torch

    if not sys.platform.startswith("linux") or torch.cuda.is_available():
        return 0
    mappings = cuda_library_mappings()
    before = sum(m.rss for m in mappings)
    if not before:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for m in mappings:
        if m.droppable and m.rss and libc.madvise(m.start, m.end - m.start, MADV_DONTNEED) != 0:
            log.debug("madvise(MADV_DONTNEED) refused (errno %d)", ctypes.get_errno())
    released = max(0, before - cuda_library_rss())
    log.info("no CUDA device: released %.0f of %.0f MB resident in CUDA libraries", released / 2**20, before / 2**20)
    return released
