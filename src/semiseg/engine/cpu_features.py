"""What this CPU computes natively: bf16 autocast pays only where the CPU has bf16 arithmetic.

With AVX512-BF16 or AMX, oneDNN runs bf16 convolutions in hardware (BENCHMARKS.md "cpu-options"). Without them
every bf16 operation goes through conversions in software and runs many times slower than fp32 itself, so
`cpu_bf16` there costs time and buys nothing: say so once, rather than let a run crawl unexplained.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo; empty where there is none (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool | None:
    """True with AVX512-BF16 or AMX, False without, None when the flags cannot be read."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None
    return any(flag in flags for flag in BF16_FLAGS)


@cache
def warn_emulated_bf16() -> bool:
    """Print, once per process, that `cpu_bf16` runs emulated on this CPU; True when it did."""
    if native_bf16() is not False:
        return False
    print("note: cpu_bf16 is on but this CPU has neither AVX512-BF16 nor AMX, so bf16 is emulated and much slower "
          "than fp32; leave cpu_bf16 off (drop --cpu-bf16 / --set cpu_bf16=true) on this machine", file=sys.stderr,
          flush=True)
    return True
