"""Integrations with training engines and libraries. Each is imported on its own
(``from dpscale.integrations.accelerate import make_private``,
``from dpscale.integrations.trainer import DPTrainer``) so dpscale never imports a library the user
does not use."""
