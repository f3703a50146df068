"""What this CPU computes natively: the choice of a default precision depends on it."""

import functools
import platform

# Vector/matrix extensions that decide each precision's speed, as /proc/cpuinfo names them.
ISA_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8", "asimd", "bf16", "sve",
)  # fmt: skip
NATIVE_BF16 = ("amx_bf16", "avx512_bf16", "bf16")  # Intel AMX, AVX-512 BF16, Arm BF16


@functools.lru_cache(maxsize=1)
def cpu_flags():
    """The CPU's feature flags (x86 `flags`, Arm `Features`); empty where /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa_extensions():
    """The extensions of ISA_FLAGS this CPU has, in that order."""
    return [flag for flag in ISA_FLAGS if flag in cpu_flags()]


def native_bf16():
    """The name of the extension that runs bf16 natively here, or None."""
    return next((flag for flag in NATIVE_BF16 if flag in cpu_flags()), None)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
