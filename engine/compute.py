"""What training costs on this machine: the precision its hardware runs natively, the arithmetic of one crop
(GFLOP, forward + backward) and the speed a model reaches. `train` and `bench` both ask here."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from engine.model import PRESETS, UNetTiny, count_parameters

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


def _cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` does bf16 arithmetic in hardware: AMX or AVX-512 BF16 on a CPU, bf16 units (Ampere and
    later) on a GPU. Emulated bf16 is slower than fp32, so it does not count."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    if any(probe is not None and probe() for probe in probes):
        return True
    return bool(_cpu_flags() & set(_CPU_BF16_FLAGS))


def autocast_dtype(device: torch.device, precision: str,
                   probe: Callable[[torch.device], bool] | None = None) -> torch.dtype | None:
    """The autocast dtype for training (None = plain fp32); weights and the loss always stay fp32. The one place
    precision is decided: `auto` is bf16 where the hardware probe (default native_bf16) says the device runs it
    natively, else fp32 on a CPU and fp16 (with a gradient scaler) on an older GPU."""
    if precision == "auto":
        if (probe or native_bf16)(device):  # bf16 keeps fp32's range: no gradient scaler needed
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """fp32, bf16 or fp16: how a log line names an autocast dtype."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def gflop_per_crop(model: nn.Module, crop: int) -> float:
    """Arithmetic of one training step on one crop x crop image, forward + backward, in GFLOP (counted by
    torch.utils.flop_counter: convolutions and matrix products; one multiply-add is two FLOP)."""
    model = copy.deepcopy(model).float().train()  # a copy: the real model's batch-norm statistics stay as they are
    device = next(model.parameters()).device
    # Two crops, halved: batch norm in training needs more than one value per channel at a 1x1 bottleneck.
    x = torch.zeros(2, model.in_channels, crop, crop, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).mean().backward()
    return counter.get_total_flops() / 2 / 1e9


def measure_model_speed(model: UNetTiny, batch: torch.Tensor, amp_dtype: torch.dtype | None,
                        seconds: float = 4.0, max_steps: int = 30) -> float:
    """Images per second of forward+backward on a fixed in-memory batch: the ceiling for training. Timed for
    `seconds` or `max_steps` steps, whichever ends first: a small model's steps are many in a fraction of a second,
    and a short run should not spend its budget on the probe."""
    model = copy.deepcopy(model).train()  # a copy, so batch-norm statistics of the real model stay untouched

    def step() -> None:
        with torch.autocast(batch.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model(batch).float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: the first passes build the convolution kernels
        step()
    n_images, steps, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds and steps < max_steps:
        step()
        n_images, steps = n_images + len(batch), steps + 1
    return n_images / (time.perf_counter() - start)


def preset_costs(crop: int, batch: int = 8, seconds: float = 2.0, device: torch.device | None = None,
                 precision: str = "auto") -> list[dict]:
    """Per preset: parameters, GFLOP per crop (forward + backward) and the training speed it reaches here (crops/s
    and GFLOP/s on an in-memory batch, at the precision `train` would pick)."""
    device = device or torch.device("cpu")
    amp_dtype = autocast_dtype(device, precision)
    rows = []
    for name, arch in PRESETS.items():
        model = UNetTiny(1, **arch).to(device).to(memory_format=torch.channels_last)
        size = -(-crop // model.stride) * model.stride  # a crop this preset can take: a multiple of its stride
        gflop = gflop_per_crop(model, size)
        probe = torch.randn(batch, 1, size, size, device=device).to(memory_format=torch.channels_last)
        speed = measure_model_speed(model, probe, amp_dtype, seconds)
        rows.append({"preset": name, **arch, "parameters": count_parameters(model), "crop": size,
                     "gflop_per_crop": round(gflop, 3), "crops_per_s": round(speed, 2),
                     "gflop_per_s": round(gflop * speed, 2), "precision": precision_name(amp_dtype)})
    return rows
