"""--optimizer: the job's one place that builds an optimizer, so that every phase of a run (LP-FT's
second phase included) trains with the optimizer the user chose."""

from __future__ import annotations

import torch

from dpscale.train.config import TrainConfig

__all__ = ["build_optimizer"]


def build_optimizer(config: TrainConfig, trainable: list, probing: bool = False) -> torch.optim.Optimizer:
    """AdamW, or DPAdamBC (the engine binds it to its noise std when make_private attaches it); at
    --lr, or at --lp-lr (when given) for LP-FT's probing phase."""
    lr = config.lp_lr if probing and config.lp_lr is not None else config.lr
    if config.optimizer == "adambc":
        from dpscale.optim import DPAdamBC

        return DPAdamBC(trainable, lr=lr, floor=config.adambc_floor, weight_decay=config.weight_decay)
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=config.weight_decay)
