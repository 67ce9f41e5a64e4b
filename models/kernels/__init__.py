"""CPU kernels over packed weights, built on first use with the machine's C++ compiler and cached.

One source (qmatmul.cpp) compiled per instruction set:
- `avx512`: AVX512-VNNI integer products (+ the AVX512-BF16 bf16 product where the CPU has it);
- `avxvnni`: 256-bit AVX-VNNI integer products;
- `avx2`: 256-bit AVX2 integer products (vpmaddubsw/vpmaddwd, exact for the code ranges used);
and `torch` (models/kernels/quant.py): the same arithmetic in plain torch, for CPUs with none of them or
where no compiler is found. The best variant the CPU supports is chosen at run time (`isa()`;
`LAMINA_KERNELS=torch|avx2|avxvnni|avx512` forces one, `0` means `torch`). Builds are cached under
$LAMINA_KERNEL_DIR or ~/.cache/lamina/kernels, keyed by variant, compiler flags, the CPU's feature flags, the
torch version and the source's hash. A build that fails is logged once and the next variant down is used.
The ops are real torch ops (`torch.ops.lamina_<isa>.qmm`, `.mm_bf16`) with fake implementations, so
torch.compile traces them; the fused forward is a method of a class that holds its weights (the variant's
module's `FusedModel`, see `classes()` and `models.llama.Transformer.prepare_fused`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("lamina.kernels")
SOURCE = Path(__file__).with_name("qmatmul.cpp")

# variant -> (CPU flags it needs, compiler flags, macro)
VARIANTS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"], "LAMINA_ISA_AVX512"),
    "avxvnni": (("avx2", "avx_vnni", "fma", "f16c"), ["-mavx2", "-mavxvnni", "-mfma", "-mf16c"], "LAMINA_ISA_AVX2"),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"], "LAMINA_ISA_AVX2"),
}
ORDER = ("avx512", "avxvnni", "avx2")


@cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supported(variant: str) -> bool:
    return set(VARIANTS[variant][0]) <= cpu_flags()


def _reason(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


_MODULES: dict[str, object] = {}  # op namespace -> the variant's Python module (its FusedModel, FusedCache)


def _flags(variant: str) -> list[str]:
    flags = VARIANTS[variant][1]
    return [*flags, "-mavx512bf16"] if variant == "avx512" and "avx512_bf16" in cpu_flags() else list(flags)


def build_dir(variant: str) -> Path:
    """Where a variant's build is cached: keyed by its flags, the CPU's flags, torch's version and the source."""
    key = hashlib.sha256("\n".join([SOURCE.read_text(), torch.__version__, " ".join(_flags(variant)),
                                    " ".join(sorted(cpu_flags()))]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LAMINA_KERNEL_DIR", Path.home() / ".cache" / "lamina" / "kernels"))
    return root / f"lamina_{variant}-{key}"


def built_library(variant: str) -> Path:
    """The cached build's library (in `build_dir`)."""
    return build_dir(variant) / f"lamina_{variant}.so"


def is_built(variant: str) -> bool:
    """Whether the variant's build is in the cache (loading it then takes no compiler and well under a second)."""
    return built_library(variant).is_file()


def _build(variant: str) -> str:
    """Compiles and loads one variant; returns its op namespace. Raises on failure."""
    import importlib.util

    from torch.utils.cpp_extension import load

    _, _, macro = VARIANTS[variant]
    flags = _flags(variant)
    ns = f"lamina_{variant}"
    build, built = build_dir(variant), built_library(variant)
    if getattr(_MODULES.get(ns), "__file__", None) == str(built):  # loaded before in this process: it initialises once
        return ns
    if built.is_file():  # this exact source, flags, CPU and torch: load it (no compiler needed, e.g. in Docker)
        spec = importlib.util.spec_from_file_location(ns, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # loading the library registers its torch ops too
    else:
        build.mkdir(parents=True, exist_ok=True)
        # -fopenmp: at::parallel_for is inline, and single-threaded, without it (libgomp.so.1 resolves to torch's)
        module = load(name=ns, sources=[str(SOURCE)],
                      extra_cflags=["-O3", "-fopenmp", *flags, f"-D{macro}", f"-DLAMINA_NS={ns}"],
                      extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=True, verbose=False)
    _MODULES[ns] = module
    _register_fakes(ns)
    return ns


_FAKES: set[str] = set()


def _register_fakes(ns: str) -> None:
    if ns in _FAKES:  # a variant loaded again (after a cache clear) keeps its registrations
        return
    _FAKES.add(ns)

    @torch.library.register_fake(f"{ns}::qmm")
    def _(x, qs, scales, mins, bits, group, zero, big):
        return x.new_empty((*x.shape[:-1], qs.shape[0] * 16))

    if hasattr(getattr(torch.ops, ns), "mm_bf16"):
        @torch.library.register_fake(f"{ns}::mm_bf16")
        def _(x, packed):
            return x.new_empty((*x.shape[:-1], packed.shape[0] * 16))


@cache
def load_variant(variant: str) -> str | None:
    """The op namespace of a built variant, or None (reason logged once) where it cannot run here."""
    if not supported(variant):
        return None
    try:
        return _build(variant)
    except Exception as e:  # noqa: BLE001 - no compiler, no headers, an old assembler...: fall back
        log.warning("%s kernels unavailable (%s); falling back to the next variant", variant, _reason(e))
        return None


def _order() -> tuple[tuple[str, ...], str]:
    """The variants `isa()` tries, in order, and what LAMINA_KERNELS says."""
    forced = os.environ.get("LAMINA_KERNELS", "").strip().lower()
    if forced in ("0", "torch", "none"):
        return (), forced
    return (ORDER[ORDER.index(forced):] if forced in VARIANTS else ORDER), forced


def to_compile() -> str | None:
    """The variant `isa()` would compile first (not in the cache), or None where it loads a cached build (or uses
    torch): what a first start tells the user it is waiting for."""
    if isa.cache_info().currsize:
        return None
    first = next((v for v in _order()[0] if supported(v)), None)
    return first if first is not None and not is_built(first) else None


@cache
def isa() -> str:
    """The variant in use: the forced one (LAMINA_KERNELS) if it loads, else the best that loads, else torch."""
    order, forced = _order()
    if not order:
        return "torch"
    if forced and forced != "1" and forced not in VARIANTS:
        log.warning("LAMINA_KERNELS=%s is not one of torch, %s: choosing automatically", forced, ", ".join(ORDER))
    for variant in order:
        if load_variant(variant):
            if variant != order[0] and forced in VARIANTS:
                log.warning("LAMINA_KERNELS=%s could not be used here; using %s", forced, variant)
            return variant
    log.warning("no compiled CPU kernels: quantized weights run through plain torch (slow)")
    return "torch"


def ops(variant: str | None = None):
    """The torch.ops namespace of a variant (default: the one in use), or None for torch."""
    variant = variant or isa()
    ns = None if variant == "torch" else load_variant(variant)
    return None if ns is None else getattr(torch.ops, ns)


def classes(variant: str | None = None):
    """The Python module of a variant (its FusedModel and FusedCache: the fused forward and its held
    arguments), or None for torch."""
    variant = variant or isa()
    ns = None if variant == "torch" else load_variant(variant)
    return None if ns is None else _MODULES[ns]


def has_bf16(variant: str | None = None) -> bool:
    """Whether the bf16 packed product exists (AVX512-BF16 CPUs with the avx512 variant)."""
    o = ops(variant)
    return o is not None and hasattr(o, "mm_bf16")


def qmm(x: Tensor, qs: Tensor, scales: Tensor, mins: Tensor | None, bits: int, group: int, zero: int, big: bool,
        variant: str | None = None) -> Tensor:
    return ops(variant).qmm(x, qs, scales, mins, bits, group, zero, big)


def mm_bf16(x: Tensor, packed: Tensor, variant: str | None = None) -> Tensor:
    return ops(variant).mm_bf16(x, packed)
