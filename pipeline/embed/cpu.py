"""Which inference precisions this CPU runs fast: int8 needs VNNI, bf16 needs AVX512-BF16 or AMX.

Read from the kernel's /proc/cpuinfo flags (Linux, no imports); elsewhere
OpenVINO's own capability list is asked, if OpenVINO is installed. Used to
refuse a bf16 embedder that would silently run in fp32, to pick a default
and to label benchmark figures with the hardware that produced them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# The flags that matter for ResNet50 inference, in the kernel's spelling.
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # 8-bit dot products
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # bfloat16 dot products
SHOWN_FLAGS = ("avx2", "avx512f", *INT8_FLAGS, *BF16_FLAGS)


@dataclass(frozen=True)
class CpuFeatures:
    model: str  # "AMD EPYC 9R14", or "unknown"
    cores: int  # logical CPUs this process may use
    flags: frozenset[str]

    @property
    def int8(self) -> bool:
        return any(f in self.flags for f in INT8_FLAGS)

    @property
    def bf16(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags or "amx_int8" in self.flags


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo text."""
    model, flags = "unknown", frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and model == "unknown":
            model = " ".join(value.split())
        elif name == "flags" and not flags:
            flags = frozenset(value.split())
        if model != "unknown" and flags:
            break
    return model, flags


def _openvino_flags() -> frozenset[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES as kernel-style flags (for machines without /proc)."""
    try:
        import openvino as ov

        caps = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # not installed, or no CPU plugin: know nothing rather than fail
        return frozenset()
    # OpenVINO lists INT8 on any CPU (it runs, just slower without VNNI), so only BF16 is usable.
    return frozenset({"avx512_bf16"} if "BF16" in caps else set())


def detect(cpuinfo: Path = CPUINFO) -> CpuFeatures:
    """The features of the CPU this process runs on."""
    try:
        model, flags = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:
        model, flags = "unknown", frozenset()
    if not flags:
        flags = _openvino_flags()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return CpuFeatures(model, cores or 1, flags)


def fast_precisions(features: CpuFeatures | None = None) -> list[str]:
    """The precisions that run fast here, fastest first; "fp32" is always last."""
    f = features or detect()
    return [p for p, ok in (("int8", f.int8), ("bf16", f.bf16), ("fp32", True)) if ok]


def describe(features: CpuFeatures | None = None) -> str:
    """One line for docs and benchmark output, e.g. 'AMD EPYC (2 cores; avx512_vnni ...)'."""
    f = features or detect()
    shown = [flag for flag in SHOWN_FLAGS if flag in f.flags]
    return (
        f"{f.model} ({f.cores} cores; {' '.join(shown) or 'no vector extensions found'}; "
        f"fast: {', '.join(fast_precisions(f))})"
    )
