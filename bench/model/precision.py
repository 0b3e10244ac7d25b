"""Precision names and the one autocast context every forward pass of the suite runs under."""
from __future__ import annotations

import torch


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name; None for fp32 (autocast off)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    """`torch.autocast` on `device` with `amp_dtype`, disabled when it is None (fp32)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
