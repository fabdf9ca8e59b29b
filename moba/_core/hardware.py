"""The one table of accelerator peaks (datasheet figures), for roofline plots, the performance
model, MFU in training logs and the sweep's cost estimate.

Peaks are dense (no sparsity) bf16/fp16 tensor-core FLOP/s and HBM bytes/s of the SXM boards;
a name that matches a row but has other peaks (PCIe boards, the A100 40GB) gets a caveat.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    key: str  #: substring of ``torch.cuda.get_device_name()`` that picks this row
    label: str
    bf16_flops: float  #: dense bf16/fp16 tensor-core peak, FLOP/s
    hbm_bytes: float  #: memory bandwidth, bytes/s
    fp32_flops: float | None = None  #: fp32 FMA peak (non-tensor), FLOP/s
    sms: int | None = None
    mem_gib: float | None = None


#: First match wins, so more specific names come first ("L40S" before "L4").
DEVICES = (
    Device("H200", "H200 SXM", 989.4e12, 4.8e12, 66.9e12, 132, 141),
    Device("H100", "H100 SXM", 989.4e12, 3.35e12, 66.9e12, 132, 80),
    Device("A100", "A100 80GB", 312e12, 2.0e12, 19.5e12, 108, 80),
    Device("L40S", "L40S", 362e12, 0.864e12),
    Device("L4", "L4", 121e12, 0.3e12),
    Device("4090", "RTX 4090", 165e12, 1.0e12),  # fp16/bf16 with fp32 accumulation
    # Any CPU: fixed fp32 ceilings, measured once with bench.roofline.measure_peaks() on this
    # project's 2-core Xeon, idle (bench/results/cpu-xeon-2core-2026-11-22/generate-cpu-tiny-greedy/
    # roofline.json: 344 GFLOP/s, 9.39 GB/s; the T=1 run's measurement gave 293 GFLOP/s, 9.40 GB/s).
    # Not this machine's: a fixed row keeps CPU plots comparable (--measure measures this CPU).
    Device("CPU", "CPU (fixed: 2-core Xeon fp32, measured 2026-11-22)", 344e9, 9.39e9),
)
#: Names that match a row above but have other peaks: a caveat says so.
CAVEATS = {"PCIe": "PCIe boards have lower peaks than the table's SXM figures",
           "40GB": "the A100 40GB has 1.555 TB/s, not 2.0"}


def find_device(name: str | None) -> Device | None:
    """The row whose key is in ``name`` (case-insensitive), or None when unknown."""
    if not name:
        return None
    return next((d for d in DEVICES if d.key.lower() in name.lower()), None)


def caveat(name: str) -> str | None:
    """Why the row ``find_device(name)`` may overstate this device's peaks, or None."""
    return next((w for k, w in CAVEATS.items() if k.lower() in name.lower()), None)


def peak_flops(name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by name, or None when unknown."""
    device = find_device(name)
    return None if device is None else device.bf16_flops
