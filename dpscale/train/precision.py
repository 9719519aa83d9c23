"""Mixed precision for ``dpscale train`` (``--mixed-precision``, YAML ``mixed_precision``).

"bf16": the forward and backward run under ``torch.autocast(bfloat16)`` (Accelerate's
``mixed_precision="bf16"``, which wraps the prepared model's forward), while everything the
guarantee rests on stays in float32: the weights and the optimizer (master weights), the
per-example squared norms and clip factors (the rules accumulate in float32 whatever dtype the
activations and output gradients arrive in: ``dpscale.per_example.accumulation_dtype``), the
clipped sums (buffers of the parameters' dtype), and the noise, added in float32 to those sums.
bf16 only makes each example's gradient slightly different (about 2^-8 relative per rounding);
the bound ``||clip(g_i)|| <= R`` holds for the gradient that is actually summed, because the
norm and the sum are computed from the same bf16 factors in float32.

It is accepted only where the hardware computes in bf16: a CUDA GPU that reports bf16 support,
or a CPU with AVX512-BF16 or AMX-BF16 (x86) or bf16 matrix instructions (Arm, through oneDNN).
Elsewhere torch emulates bf16 and the step is slower than in float32 (BENCHMARKS.md measures it
on this project's AVX2 CPU), so the job refuses it, naming the fix.

"fp16" is refused: float16's range needs loss scaling (a GradScaler), which would unscale
gradients dpscale never scaled and skip steps on overflow that the accountant still counts.
"""

from __future__ import annotations

import torch

from dpscale.errors import ConfigError

__all__ = [
    "MIXED_PRECISIONS", "check_mixed_precision", "check_mixed_precision_name", "check_requested_precision",
    "cpu_supports_bf16",
]

MIXED_PRECISIONS = ("no", "bf16")


def cpu_supports_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (not emulation): AVX512-BF16 or AMX-BF16 on x86,
    oneDNN's bf16 path (Arm with BF16 instructions, or the x86 flags above)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        if found.get("avx512_bf16") or found.get("amx_bf16"):
            return True
    mkldnn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(mkldnn is not None and mkldnn())


def _device_supports_bf16(device: torch.device) -> bool:
    if device.type == "cpu":
        return cpu_supports_bf16()
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True  # other accelerators (XPU, MPS, ...): Accelerate checks its own


def check_mixed_precision_name(mixed_precision) -> str:
    """The name, normalised ("no" or "bf16"; YAML reads an unquoted ``no`` as False); fp16 and
    unknown names refused when the config is built."""
    value = "no" if mixed_precision is False or mixed_precision is None else str(mixed_precision).lower()
    if value == "fp16":
        raise ConfigError(
            "mixed precision fp16 needs loss scaling (a GradScaler), which would unscale gradients dpscale "
            "never scaled and skip steps on overflow that the accountant still counts: it is not supported. "
            "Use --mixed-precision bf16 (mixed_precision: bf16) on hardware with bf16, or --mixed-precision no."
        )
    if value not in MIXED_PRECISIONS:
        raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {mixed_precision!r}.")
    return value


def check_mixed_precision(mixed_precision, device: torch.device) -> str:
    """Refuse, before the model loads, a precision the job cannot run as asked: fp16 (loss
    scaling), bf16 on a device without bf16 arithmetic. ``mixed_precision`` is the effective one
    (the flag, or ``accelerate launch --mixed_precision``, or a DeepSpeed config's "bf16" block);
    returns it normalised."""
    value = check_mixed_precision_name(mixed_precision)
    if value == "bf16" and not _device_supports_bf16(device):
        where = ("this CPU has neither AVX512-BF16 nor AMX-BF16" if device.type == "cpu"
                 else f"the {device.type} device reports no bf16 support")
        raise ConfigError(
            f"mixed precision bf16 was asked for, but {where}: torch would emulate bf16, slower than float32 "
            "(BENCHMARKS.md). Run with --mixed-precision no (mixed_precision: \"no\" in the YAML; and without "
            "accelerate launch --mixed_precision bf16 or a DeepSpeed \"bf16\" block), or on a bf16-capable CPU or GPU."
        )
    return value


def check_requested_precision(mixed_precision, *, cpu: bool) -> None:
    """The flag's own request, checked before the Accelerator exists (Accelerate keeps its mixed
    precision in process-wide state, which a refused request should never reach): bf16 on the
    device the job will take (a CUDA GPU unless ``cpu`` or none is visible)."""
    if mixed_precision is None:
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    check_mixed_precision(mixed_precision, device)
