"""Where a model runs and in which precision: the one home of device and dtype choices.

`pick_device` turns a user's device name into a torch.device (with errors that say
what to type instead); `decode_dtype` and `train_autocast_dtype` turn the
`decode.precision` and `train.precision` settings into a dtype the device can run.

bf16 on a CPU is only fast where the CPU has native bf16 instructions (AVX512-BF16
or AMX on x86, the BF16 extension on Arm). Elsewhere oneDNN emulates it and decoding
gets several times slower than fp32 (measured 5.5x on an AVX2-only EPYC), so asking
for bf16 there warns once, and `auto` chooses fp32.
"""

from __future__ import annotations

import functools
import platform
import sys

import torch

from mt.config import Precision
from mt.errors import ConfigError, MTError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str | None, where: str = "--device") -> torch.device:
    """'auto', '' or None -> cuda when available, else cpu; otherwise the named device.

    A name torch does not know, or a CUDA device this machine lacks, is an MTError that
    names the option `where` the name came from.
    """
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise MTError(f"{where} {name}: not a device name ({e}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MTError(f"{where} {name}: CUDA is not available on this machine; use {where} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MTError(f"{where} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# --------------------------------------------------------------------------- the CPU


CPUINFO = "/proc/cpuinfo"  # Linux's; elsewhere there is none


def _cpuinfo(key: str) -> str | None:
    """The first value of `key` in CPUINFO; None where there is none (not Linux)."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel lists them ('flags' on x86, 'Features' on Arm)."""
    return set((_cpuinfo("flags") or _cpuinfo("Features") or "").split())


@functools.cache
def cpu_is_intel() -> bool:
    """Whether the CPU is Intel's ('GenuineIntel' in /proc/cpuinfo)."""
    return _cpuinfo("vendor_id") == "GenuineIntel"


@functools.cache
def cpu_description() -> str:
    """The CPU's model name and the flags that decide CPU speed here, e.g. for CI logs."""
    name = _cpuinfo("model name") or platform.processor() or platform.machine()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16")
    flags = _cpu_flags()
    present = [f for f in wanted if f in flags]
    return f"{name}; flags: {' '.join(present) or 'none of ' + ' '.join(wanted)}"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (else oneDNN emulates it, slowly)."""
    flags = _cpu_flags()
    if {"avx512_bf16", "amx_bf16"} & flags:
        return True
    # Arm's BF16 extension ('bf16' in Features); Apple silicon has it from M2 on, but has
    # no /proc/cpuinfo: there we do not know, and do not assume.
    return platform.machine() in ("aarch64", "arm64") and "bf16" in flags


# --------------------------------------------------------------------------- precision


@functools.cache
def _warn_emulated_bf16() -> None:
    """Once per process (functools.cache): a model is often loaded more than once."""
    print(
        "mt: warning: bf16 on this CPU is emulated (no avx512_bf16 or amx_bf16: "
        f"{cpu_description()}) and decodes several times slower than fp32; "
        "use precision fp32 (or auto, which picks the faster one)",
        file=sys.stderr,
    )


def decode_precision(precision: Precision, device: torch.device) -> Precision:
    """The precision to decode in: `decode.precision` resolved for `device`.

    auto: bf16 on GPUs that support it and on CPUs with native bf16, fp32 everywhere
    else. fp16 on a CPU is a ConfigError; bf16 on a CPU that would emulate it warns once.
    """
    if precision not in (*DTYPES, "auto"):
        raise ConfigError(f"precision must be one of auto, {', '.join(DTYPES)}; got {precision!r}")
    if device.type == "cpu":
        if precision == "fp16":
            raise ConfigError("decode.precision=fp16 needs a GPU; on CPU use bf16 (or fp32)")
        if precision == "auto":
            return "bf16" if cpu_has_native_bf16() else "fp32"
        if precision == "bf16" and not cpu_has_native_bf16():
            _warn_emulated_bf16()
        return precision
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def train_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.precision` on `device`, or None for fp32.

    Training autocasts only on GPUs; on a CPU bf16/fp16 are refused with a warning
    and fp32 is used (CPU autocast gains little and changes the numbers).
    """
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            print(
                f"mt train: train.precision={precision} needs a GPU; using fp32 on {device}", file=sys.stderr
            )
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
