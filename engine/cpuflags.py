"""The CPU this process runs on: its model name and the instruction-set flags that change INT8 and bf16 numerics."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# The flags that pick a different INT8 or bf16 kernel in ONNX Runtime or OpenVINO: U8S8 convolutions on AVX2
# without VNNI sum pairs of products in 16 bits (VPMADDUBSW, may saturate), with VNNI or AMX in 32 bits.
NUMERIC_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    """Model name and flags from /proc/cpuinfo (the platform's processor string and no flags elsewhere)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    return model, tuple(fields.get("flags", "").split())


def cpu_model() -> str:
    """The CPU's model name, e.g. 'AMD EPYC 9B45'."""
    return _cpuinfo()[0]


def cpu_flags() -> list[str]:
    """The NUMERIC_FLAGS this CPU has, in that order (what report.json records for each accuracy gate)."""
    present = set(_cpuinfo()[1])
    return [flag for flag in NUMERIC_FLAGS if flag in present]


def flags_key(flags: list[str]) -> str:
    """A file-name-safe key for a set of flags ('avx2-avx512f-avx512_vnni'; 'none' for none)."""
    return "-".join(flags) or "none"
