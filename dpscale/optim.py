"""DP-AdamBC: Adam whose second moment is corrected for the DP noise it knows is there (Tang,
Shpilevskiy and Lecuyer, "DP-AdamBC: Your DP-Adam Is Actually DP-SGD (Unless You Apply Bias
Correction)", AAAI 2024).

Why. The gradient a DP optimizer sees is g~ = g + z, with z ~ N(0, s^2 I) and s = sigma R / B the
std of the noise in each coordinate of the averaged gradient. Adam's second moment estimates
E[g~^2] = g^2 + s^2, and in DP training s^2 usually dominates, so Adam's denominator
sqrt(v) ~ s is the same constant for every coordinate: DP-Adam behaves like DP-SGD with momentum
and a rescaled learning rate. DP-AdamBC subtracts the known noise variance before the square root:

    m_t = b1 m_{t-1} + (1 - b1) g~_t            m^_t = m_t / (1 - b1^t)
    v_t = b2 v_{t-1} + (1 - b2) g~_t^2          v^_t = v_t / (1 - b2^t)
    phi_t = b2 phi_{t-1} + (1 - b2) s_t^2       phi^_t = phi_t / (1 - b2^t)
    theta_t = theta_{t-1} - lr m^_t / sqrt(max(v^_t - phi^_t, floor))

(the paper's update, lr m^ / sqrt(max(v^ - Phi, gamma')), without Adam's additive epsilon, as in
the authors' code). phi^_t is the exact expectation of the noise's share of v^_t: it equals s^2
when s is constant, and stays exact when s changes from step to step (adaptive clipping moves R).
The floor (gamma') keeps the denominator positive where the estimate v^ - phi^ is small or
negative; it bounds each coordinate's step by lr |m^| / sqrt(floor), so DP-AdamBC wants a much
smaller learning rate than DP-Adam (the paper tunes them separately). Weight decay is decoupled
(AdamW's p <- p (1 - lr wd)), so it never enters the moments.

Where s comes from. The user never gives it: the privacy engine binds the optimizer when it is
attached (``engine.attach_optimizer``, ``PrivacyEngine(..., optimizer=)``, ``make_private``, or
as DeepSpeed's base optimizer), and at each step the optimizer reads ``engine.step_noise_std``,
the std of the noise the engine has just added to every coordinate of the gradient in ``p.grad``:
the plan's sigma R / B (per-layer or group clipping noise every coordinate at the total R; user
level at the user-level R; data-parallel ranks and micro-batches add one draw per coordinate, all
after the 1/B), or with adaptive clipping sigma_delta R_t / B. Stepped without an engine, it
refuses.

Privacy: the update is a function of the noised gradients and public constants only, so it is
post-processing; the accounting does not change.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dpscale.errors import ConfigError, StepBoundaryError

__all__ = ["DPAdamBC"]


class DPAdamBC(torch.optim.Optimizer):
    """Adam with the DP noise variance removed from its second moment (see the module docstring).

    lr, betas: as Adam's. floor: gamma', the least value of the corrected second moment (default
    1e-8, the authors' default). weight_decay: decoupled, as AdamW's.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), floor: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        if not (_finite(lr) and lr > 0):
            raise ConfigError(f"DPAdamBC lr must be a positive number, got {lr!r}.")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"DPAdamBC betas must be two numbers in [0, 1), got {betas!r}.")
        if not (_finite(floor) and floor > 0):
            raise ConfigError(
                f"DPAdamBC floor must be a positive number (the corrected second moment may be 0 or negative), "
                f"got {floor!r}."
            )
        if not (_finite(weight_decay) and weight_decay >= 0):
            raise ConfigError(f"DPAdamBC weight_decay must be a number >= 0, got {weight_decay!r}.")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "floor": floor, "weight_decay": weight_decay})
        self._noise_std: Callable[[], float | None] | None = None

    def bind_noise_std(self, source: Callable[[], float | None]) -> None:
        """Called by the privacy engine this optimizer is attached to: ``source()`` is the std of the
        noise in each coordinate of the gradient being applied."""
        self._noise_std = source

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._noise_std is None:
            raise ConfigError(
                "DPAdamBC subtracts the variance of the noise the privacy engine adds, so it must be attached to "
                "one: engine.attach_optimizer(DPAdamBC(engine.parameters.values(), lr=...)) (or PrivacyEngine(..., "
                "optimizer=...), or make_private(accelerator, model, optimizer, config))."
            )
        std = self._noise_std()
        if std is None:
            raise StepBoundaryError(
                "DPAdamBC was stepped before its privacy engine closed a step, so there is no noised gradient to "
                "apply: step it only through engine.step() / optimizer.step() after engine.backward."
            )
        variance = float(std) ** 2
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._update(p, group["lr"], beta1, beta2, group["floor"], group["weight_decay"], variance)
        return loss

    def _update(self, p: torch.Tensor, lr: float, beta1: float, beta2: float, floor: float, weight_decay: float,
                variance: float) -> None:
        state = self.state[p]
        dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
            state["noise_var_avg"] = 0.0  # the EMA of s_t^2, as v's of g~^2 (a float64 scalar)
        state["step"] += 1
        t = state["step"]
        grad = p.grad.to(dtype)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["noise_var_avg"] = beta2 * state["noise_var_avg"] + (1 - beta2) * variance
        correction1, correction2 = 1 - beta1 ** t, 1 - beta2 ** t
        noise_var = state["noise_var_avg"] / correction2
        denominator = (exp_avg_sq / correction2).sub_(noise_var).clamp_(min=floor).sqrt_()
        update = (exp_avg / correction1).div_(denominator)
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        p.add_(update.to(p.dtype), alpha=-lr)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
