"""The non-private baseline of ``dpscale train --non-private``: what the private run would reach
with no privacy, for comparison. It has no engine, so no step driver: a plain loop of shuffled
batches, checkpointed in the job's format (without a privacy state) so that it resumes like the
private run."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch

from dpscale.accounting import steps_for_epochs
from dpscale.train.checkpoint import save_checkpoint
from dpscale.train.config import TrainConfig
from dpscale.train.report import Trained, log_step, progress

__all__ = ["train_non_private"]


def train_non_private(config: TrainConfig, task, model, optimizer, accelerator, state: dict | None, folder: Path,
                      before: dict) -> Trained:
    """The same model, data, batch size, steps, learning rate and optimizer, with no clipping and no
    noise: shuffled batches of ``batch_size``, the mean loss over each batch. At user level (a
    user-level config run as its baseline) nothing is protected; each batch holds the rows a private
    step brings in expectation (batch_size users times the mean rows a drawn user brings) and the
    length is the private run's (epochs of N users), so both runs see as much data."""
    dataset = task.train.dataset
    size = len(dataset)
    if task.users is None:
        batch = max(1, min(size, round(config.batch_size)))
        rate = batch / size
    else:
        counts = Counter(task.users).values()
        k = config.examples_per_user or 1
        brought = sum(min(k, n) for n in counts) / len(counts)
        batch = max(1, min(size, round(config.batch_size * brought)))
        rate = config.batch_size / len(counts)
    steps = min(config.max_steps or 2**62, steps_for_epochs(config.epochs, rate) if config.epochs else 2**62)
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    history = list(state["history"]) if state else []
    step = state["step"] if state else 0
    for _ in range(step):  # the same batches as an uninterrupted run
        order = _next_batch(order, size, batch, generator)[1]
    bar = progress(accelerator, steps, step)
    model.train()
    stop = steps if config.stop_after is None else min(steps, step + config.stop_after)
    while step < stop:
        started = time.perf_counter()
        indices, order = _next_batch(order, size, batch, generator)
        indices = indices[accelerator.process_index :: accelerator.num_processes]
        total = 0.0
        for start in range(0, len(indices), config.micro_batch):
            micro = task.train.collate([dataset[i] for i in indices[start : start + config.micro_batch]])
            losses = task.losses(model, micro, accelerator.device)
            accelerator.backward(losses.sum() / batch * accelerator.num_processes)
            total += float(losses.detach().sum())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "loss": total / max(len(indices), 1), "step_seconds": time.perf_counter() - started,
                  "batch": batch}
        history.append(record)
        log_step(accelerator, bar, record)
        if step % config.checkpoint_every == 0 or step == stop:
            save_checkpoint(folder, accelerator, model, optimizer, None, history, before, step=step,
                            job=task.job)
    bar.close()
    return Trained(history, step, "end", {"epsilon": None, "non_private": True})


def _next_batch(order: list[int], size: int, batch: int, generator: torch.Generator):
    """One batch of indices from ``order``, reshuffled from ``generator`` when it runs short: a
    resumed run replays the draws to reach the batches an uninterrupted one would see."""
    if len(order) < batch:
        order = order + torch.randperm(size, generator=generator).tolist()
    return order[:batch], order[batch:]
