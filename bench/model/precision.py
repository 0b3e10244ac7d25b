"""Precision: which dtype holds the frozen weights, which holds the trainable ones, and the one autocast context every
forward pass of the suite runs under. docs/measurement.md (Precision) says why each mode is what it is.

    precision    frozen   trainable                          autocast           where
    fp32         fp32     fp32                               off                CPU, CUDA
    bf16         bf16     fp32 (full fine-tuning: bf16)      bf16               CUDA with bf16; CPU (slow)
    bf16-mixed   fp32     fp32                               bf16               CUDA with bf16; CPU (slow)
    fp16-mixed   fp32     fp32                               fp16, loss scaled  CUDA

`auto` is `bf16` on a CUDA GPU that supports bf16 and `fp32` everywhere else (the CPU included). A trainable
parameter's gradient and AdamW's moments take its dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench import BenchError

AUTO = "auto"
MODES = ("fp32", "bf16", "bf16-mixed", "fp16-mixed")  # what a run's precision resolves to (its effective config)
PRECISIONS = (AUTO, *MODES)  # what `precision=` may say (bench/plan/schema.py)
CUDA_ONLY = ("fp16-mixed",)  # fp16's range needs the loss scaler, which the suite runs on CUDA only
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = {name: dtype for dtype, name in NAMES.items()}


@dataclass(frozen=True)
class Dtypes:
    """What a precision mode means for one method: the dtype the pre-trained (frozen) weights are loaded in, the
    dtype every trainable parameter is held in (and so its gradient and AdamW's moments), and autocast's dtype
    (None: off)."""

    weights: torch.dtype
    trainable: torch.dtype
    autocast: torch.dtype | None

    def names(self) -> dict[str, str | None]:
        """The record's fields: `weight_dtype`, `trainable_dtype`, `autocast_dtype`."""
        return {"weight_dtype": dtype_name(self.weights), "trainable_dtype": dtype_name(self.trainable),
                "autocast_dtype": dtype_name(self.autocast) if self.autocast is not None else None}


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, bf16, fp16 (else torch's own name, e.g. uint8 for bitsandbytes' packed 4-bit weights)."""
    return NAMES.get(dtype, str(dtype).removeprefix("torch."))


def resolve_precision(name: str, device_type: str, bf16_supported: bool = True) -> str:
    """The mode a `precision=` value runs as on this device type: `auto` is bf16 on a CUDA GPU with bf16 support,
    else fp32. BenchError (one line) for a mode this device cannot run; a name outside `auto` and MODES is refused
    earlier, by the config schema (bench/plan/schema.py)."""
    if name == AUTO:
        return "bf16" if device_type == "cuda" and bf16_supported else "fp32"
    if name not in MODES:
        raise BenchError(f"precision={name}: choose one of {AUTO}, {', '.join(MODES)}")
    if device_type != "cuda" and name in CUDA_ONLY:
        raise BenchError(f"precision={name} is for CUDA (fp16 needs the loss scaler); on {device_type} use "
                         "precision=fp32, bf16 or bf16-mixed")
    if device_type == "cuda" and name.startswith("bf16") and not bf16_supported:
        raise BenchError(f"precision={name}: this GPU does not support bf16; use precision=fp16-mixed or fp32")
    return name


def precision_dtypes(precision: str, trains_all_weights: bool = False) -> Dtypes:
    """The dtypes of a resolved precision mode for a method; `trains_all_weights`: full fine-tuning, whose weights
    are all trainable. Under `bf16` the frozen weights are bf16 and the trainable ones fp32 (adapters and the task
    head, as peft's `autocast_adapter_dtype=True` holds them), except for full fine-tuning, which has no frozen
    weights and trains in pure bf16 (weights, gradients and AdamW moments), as peft's benchmark and torchtune do;
    `bf16-mixed` is full fine-tuning with fp32 master weights."""
    if precision == "fp32":
        return Dtypes(torch.float32, torch.float32, None)
    if precision == "bf16":
        return Dtypes(torch.bfloat16, torch.bfloat16 if trains_all_weights else torch.float32, torch.bfloat16)
    if precision == "bf16-mixed":
        return Dtypes(torch.float32, torch.float32, torch.bfloat16)
    if precision == "fp16-mixed":
        return Dtypes(torch.float32, torch.float32, torch.float16)
    raise BenchError(f"precision={precision}: not a resolved mode ({', '.join(MODES)})")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision mode; None for fp32 (autocast off)."""
    return precision_dtypes(precision).autocast


def uses_loss_scaler(precision: str) -> bool:
    """fp16's narrow range needs the loss scaled before backward (torch.amp.GradScaler)."""
    return autocast_dtype(precision) == torch.float16


def hold_trainable(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Every trainable floating-point parameter held in `dtype` (in place; the model returned). A method attached to
    a bf16 base makes its own tensors in the base's dtype (BitFit's biases, LN tuning's norms, bottleneck adapters,
    the task head); peft already upcasts its adapters (`autocast_adapter_dtype`). Frozen parameters stay as loaded,
    except in a LayerNorm that trains in part (BitFit's biases): its weight follows its bias, as layer_norm takes
    one dtype for both on CPU (on CUDA autocast runs it in fp32 anyway)."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        whole = isinstance(module, torch.nn.LayerNorm) and any(p.requires_grad for p in own)
        for param in own:
            if (param.requires_grad or whole) and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model


def param_bytes_by_dtype(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Bytes of the model's parameters by dtype, frozen and trainable apart (a tied tensor counted once): what the
    weights take, as held."""
    out: dict[str, dict[str, int]] = {"frozen": {}, "trainable": {}}
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        part = out["trainable" if param.requires_grad else "frozen"]
        name = dtype_name(param.dtype)
        part[name] = part.get(name, 0) + param.numel() * param.element_size()
    return out


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    """`torch.autocast` on `device` with `amp_dtype`, disabled when it is None (fp32)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
