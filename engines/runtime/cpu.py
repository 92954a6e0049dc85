"""The CPU's integer dot-product class: what decides how ONNX Runtime's INT8 kernels behave here.

ONNX Runtime's x86 U8xS8 kernels use ``vpmaddubsw`` where the CPU has no VNNI: it adds two
U8xS8 products into a signed 16-bit sum, which saturates (255 * 127 * 2 > 32767). With VNNI
(``vpdpbusd``, AVX512-VNNI or AVX-VNNI) or AMX the products accumulate in 32 bits. ARM's dot
product (``sdot``/``udot``) and i8mm accumulate in 32 bits as well. So the class, not the
vendor, decides which Q/DQ form is safe and which is fast:

=============  ==========================================================
class          meaning
=============  ==========================================================
amx            AMX-INT8 (and VNNI): 32-bit accumulation
avx512-vnni    AVX-512 with VNNI: 32-bit accumulation
avx-vnni       AVX-VNNI without AVX-512 (e.g. Alder Lake): 32-bit accumulation
avx512         AVX-512 without VNNI (e.g. Skylake-SP): U8xS8 pairs saturate
avx2           AVX2 only: U8xS8 pairs saturate
x86            older x86: U8xS8 pairs saturate
arm-dotprod    ARMv8.2 dot product or i8mm: 32-bit accumulation
arm            ARM without dot product (widening multiplies; no 16-bit pair sums)
unknown        the flags could not be read: treated like a CPU that saturates
=============  ==========================================================

Read from the kernel's ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on ARM): the kernel lists
an extension only when the CPU has it and the OS enabled its registers, which is what ONNX
Runtime's own cpuinfo checks. Written here rather than with py-cpuinfo: that package reads the
same file on Linux (or runs CPUID through generated machine code elsewhere) and would be one
more dependency of the production runtime for six lines of parsing. Apple silicon (Darwin
arm64) always has the dot product. Standard library only: the runtime imports this.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
from pathlib import Path

SATURATING = ("avx512", "avx2", "x86", "unknown")  # classes whose U8xS8 kernels sum pairs in 16 bits
CLASSES = ("amx", "avx512-vnni", "avx-vnni", "avx512", "avx2", "x86", "arm-dotprod", "arm", "unknown")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    model: str
    isa: str  # one of CLASSES
    cores: int

    def to_json(self) -> dict:
        return {"cpu_model": self.model, "cpu_isa": self.isa, "cpus": self.cores}


def isa_class(flags: set[str], machine: str) -> str:
    """The class of a CPU from its kernel flags and ``platform.machine()``."""
    machine = machine.lower()
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        return "arm-dotprod" if flags & {"asimddp", "i8mm"} else "arm"
    if machine not in ("x86_64", "amd64", "i686", "i386") or not flags:
        return "unknown"
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    if "avx512bw" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "x86"


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in ``/proc/cpuinfo`` text."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


@functools.lru_cache(maxsize=1)
def detect() -> CpuInfo:
    """This machine's CPU (read once per process)."""

    machine = platform.machine()
    try:
        model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        model, flags = "", set()
    isa = isa_class(flags, machine)
    if not flags and platform.system() == "Darwin" and machine.lower() == "arm64":
        isa = "arm-dotprod"
    return CpuInfo(model or platform.processor() or machine or "unknown", isa, os.cpu_count() or 1)


def saturates(isa: str) -> bool:
    """Whether ONNX Runtime's U8xS8 kernels can saturate on this class."""
    return isa in SATURATING
