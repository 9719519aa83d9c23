"""Noise drawn ahead: the keyed noise of the next step, drawn by a background thread while that
step's forward and backward run, so that the step boundary only adds it.

Why this is possible, and why it changes no value
-------------------------------------------------
Coordinate j of parameter `name` at step t gets std * z(key, t, name, j): nothing of the data, so
the noise of step t + 1 can be drawn before step t + 1's gradients exist. The thread draws exactly
what the step boundary would draw (`host_generator.scaled_noise_into`: the same float64 product
std * z), and the boundary adds it the same way (`host_generator.add_scaled_`: round(x + std * z),
rounded once), so every noised gradient is bit-identical to the one drawn at the step.

What is drawn, and why stale noise cannot be used
-------------------------------------------------
The requests of a step (parameter name, offset, element count, in the backend's order) are
recorded as the step boundary makes them; the next step's noise is drawn for the same requests at
the next step index. At the step, a request is served from the drawn noise only when the drawn
plan was made for this very step index and std and the request is the plan's next one, in order;
anything else (the first step, a resumed run at another step, a step refused and retried, a
backend whose requests changed, a device tensor) cancels the plan and draws at the step, as
without this module. So a value drawn for (t, name, j) is only ever added as (t, name, j).

Memory and threads
------------------
The drawn noise is float64 (8 bytes a coordinate, the bits the once-rounded addition needs):
at most `max_mb` is held at a time (plus one piece of at most 8 MiB), in pieces consumed and freed
in order at the step; past the budget the thread waits, and goes on drawing while the step
consumes. `threads` threads draw (the background thread and a `NoiseWorkers` pool), and the same
pool serves noise drawn at the step. The thread is a daemon holding only its own state (never the
engine), stopped by ``close()`` (``engine.detach()``) or when its owner is garbage-collected. An
exception while drawing is kept and raised at the step as a ``StepBoundaryError``: a step never
goes on with missing noise.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from dpscale.errors import ConfigError, StepBoundaryError
from dpscale.noise import host_generator
from dpscale.noise.api import _check_request, _check_target, add_gaussian_noise_, select_generator
from dpscale.noise.key import NoiseKey
from dpscale.noise.workers import NoiseWorkers

__all__ = ["DEFAULT_NOISE_AHEAD", "NoiseAhead", "NoiseAheadOptions"]

_MAX_PIECE = 1 << 20  # elements of one drawn piece (8 MiB of float64)
_WAIT_S = 0.5  # how often a waiting step checks that the drawing thread is still alive

Request = tuple[str, int, int]  # (parameter name, offset, element count)
NoiseFn = Callable[[str, Tensor, int], None]  # dpscale.backends.base.NoiseFn


@dataclass(frozen=True)
class NoiseAheadOptions:
    """How the next step's noise is drawn ahead (``PrivacyEngine(noise_ahead=...)``; ``None`` draws
    every step's noise at its step, as before).

    threads: threads that draw the noise, ahead of the step and at it (1: one background thread).
    max_mb: the most drawn noise held at a time, in MiB of float64 (8 bytes a coordinate); noise
        past it is drawn while the step consumes the rest.
    """

    threads: int = 1
    max_mb: float = 256.0

    def __post_init__(self) -> None:
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"NoiseAheadOptions(threads=...) must be an int >= 1, got {self.threads!r}.")
        if isinstance(self.max_mb, bool) or not isinstance(self.max_mb, (int, float)) or not (
                math.isfinite(self.max_mb) and self.max_mb > 0):
            raise ConfigError(f"NoiseAheadOptions(max_mb=...) must be a number > 0, got {self.max_mb!r}.")


DEFAULT_NOISE_AHEAD = NoiseAheadOptions()  # frozen: a default, not shared state


@dataclass(eq=False)
class _Plan:
    """The noise of one step for a list of requests, cut into pieces drawn in order."""

    step: int
    std: float
    requests: tuple[Request, ...]
    pieces: list[tuple[int, int, int]]  # (request index, start, stop) within the request
    first_piece: list[int]  # of each request, into pieces
    drawn: dict[int, np.ndarray | BaseException] = field(default_factory=dict)
    next_to_draw: int = 0
    held: int = 0  # bytes drawn or being drawn, not yet consumed
    peak: int = 0
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True
        self.drawn.clear()
        self.held = 0


class _Shared:
    """What the drawing thread shares with its owner (and nothing else: the thread must not keep
    the owner alive)."""

    def __init__(self, key: NoiseKey, workers: NoiseWorkers, max_bytes: int) -> None:
        self.key = key
        self.workers = workers
        self.max_bytes = max_bytes
        self.cond = threading.Condition()
        self.plan: _Plan | None = None
        self.closed = False
        self.thread: threading.Thread | None = None


def _close(shared: _Shared) -> None:
    with shared.cond:
        shared.closed = True
        if shared.plan is not None:
            shared.plan.cancel()
            shared.plan = None
        shared.cond.notify_all()
    shared.workers.close()


def _draw_ahead(shared: _Shared) -> None:
    """The background thread: draw the pieces of the current plan in order, within the budget."""
    cond = shared.cond
    while True:
        with cond:
            while True:
                if shared.closed:
                    return
                plan = shared.plan
                if plan is not None and plan.next_to_draw < len(plan.pieces):
                    index = plan.next_to_draw
                    nbytes = 8 * (plan.pieces[index][2] - plan.pieces[index][1])
                    if plan.held == 0 or plan.held + nbytes <= shared.max_bytes:
                        break
                cond.wait()
            plan.next_to_draw += 1
            plan.held += nbytes
            plan.peak = max(plan.peak, plan.held)
        which, start, stop = plan.pieces[index]
        name, offset, _ = plan.requests[which]
        try:
            drawn: np.ndarray | BaseException = host_generator.scaled_noise_into(
                np.empty(stop - start), shared.key, plan.step, name, plan.std, offset + start, shared.workers)
        except BaseException as error:  # noqa: BLE001 - raised at the step that needs this piece
            drawn = error
        with cond:
            if not plan.cancelled:
                plan.drawn[index] = drawn
            cond.notify_all()


class NoiseAhead:
    """Draws the next step's noise ahead (``prepare``) and serves it at the step (``noise_fn``)."""

    def __init__(self, key: NoiseKey, options: NoiseAheadOptions | None) -> None:
        if options is not None and not isinstance(options, NoiseAheadOptions):
            raise ConfigError(
                f"noise_ahead must be a dpscale.noise.NoiseAheadOptions or None, got {type(options).__name__}."
            )
        self.enabled = options is not None
        options = options or NoiseAheadOptions()
        self.workers = NoiseWorkers(options.threads)
        self.max_bytes = int(options.max_mb * 2**20)
        self._piece = max(4096, min(_MAX_PIECE, self.max_bytes // 16))
        self._shared = _Shared(key, self.workers, self.max_bytes)
        self._recorded: list[Request] = []  # the requests of the last step, in order
        self._finalizer = weakref.finalize(self, _close, self._shared)
        self.last_peak_bytes = 0  # the most drawn noise held at once for the last step served

    @property
    def thread(self) -> threading.Thread | None:
        return self._shared.thread

    def close(self) -> None:
        """Stop drawing, drop what was drawn, stop the threads (idempotent); later steps draw their
        noise at the step."""
        self.enabled = False
        self._finalizer()

    def prepare(self, step: int, std: float) -> None:
        """Start drawing step `step`'s noise for the requests the last step made (nothing to do if
        that is already under way, if std is 0, or before the first step)."""
        requests = tuple(self._recorded)
        if not (self.enabled and std > 0 and requests):
            return
        shared = self._shared
        with shared.cond:
            if shared.closed:
                return
            plan = shared.plan
            if plan is not None and (plan.step, plan.std, plan.requests) == (step, std, requests):
                return
            if plan is not None:
                plan.cancel()
            shared.plan = self._plan(step, std, requests)
            shared.cond.notify_all()
        if shared.thread is None:
            shared.thread = threading.Thread(target=_draw_ahead, args=(shared,), daemon=True,
                                             name="dpscale-noise-ahead")
            shared.thread.start()

    def noise_fn(self, step: int, std: float) -> NoiseFn:
        """The step's ``add_noise(name, flat, offset)``: served from the drawn plan where it was
        made for this step, std and request, drawn here otherwise; the requests are recorded for the
        next ``prepare``."""
        key, workers, shared = self._shared.key, self.workers, self._shared
        with shared.cond:
            plan, shared.plan = shared.plan, None
            if plan is not None and (plan.step, plan.std) != (step, std):
                plan.cancel()
                plan = None
            if plan is not None:
                shared.plan = plan  # the thread goes on drawing it while the step consumes it
        recorded: list[Request] = []
        cursor = [0]  # the plan's next request
        state = {"plan": plan}

        def add_noise(name: str, flat: Tensor, offset: int) -> None:
            if std <= 0 or not flat.numel():
                return
            if select_generator(flat.device) != "host" or not flat.is_contiguous():
                add_gaussian_noise_(flat, key, step, name, std, offset=offset)
                return
            request = (name, offset, flat.numel())
            recorded.append(request)
            current = state["plan"]
            if current is not None and cursor[0] < len(current.requests) and current.requests[cursor[0]] == request:
                _check_target(flat, std)
                _check_request(key, step, name, flat.numel(), offset)
                self._serve(current, cursor[0], flat.detach())
                cursor[0] += 1
                if cursor[0] == len(current.requests):
                    self._finish(current)
                    state["plan"] = None
                return
            if current is not None:
                self._finish(current)
                state["plan"] = None
            add_gaussian_noise_(flat, key, step, name, std, offset=offset, workers=workers)

        self._recorded = recorded  # filled as this step's requests are made
        return add_noise

    # internals --------------------------------------------------------------------------------

    def _plan(self, step: int, std: float, requests: tuple[Request, ...]) -> _Plan:
        pieces, first = [], []
        for which, (_, _, numel) in enumerate(requests):
            first.append(len(pieces))
            pieces.extend((which, a, min(a + self._piece, numel)) for a in range(0, numel, self._piece))
        return _Plan(step, std, requests, pieces, first)

    def _serve(self, plan: _Plan, which: int, flat: Tensor) -> None:
        """Add request `which`'s drawn pieces to `flat`, waiting for each as the thread draws it."""
        shared = self._shared
        first = plan.first_piece[which]
        last = plan.first_piece[which + 1] if which + 1 < len(plan.requests) else len(plan.pieces)
        for index in range(first, last):
            _, start, stop = plan.pieces[index]
            with shared.cond:
                while index not in plan.drawn:
                    if plan.cancelled or shared.closed:
                        raise StepBoundaryError(
                            f"The noise drawn ahead for step {plan.step} was dropped while the step used it (the "
                            "engine was detached during its step?). No update was made with it; restart from the "
                            "last checkpoint.")
                    if shared.thread is None or not shared.thread.is_alive():
                        raise StepBoundaryError(
                            f"The thread drawing the noise of step {plan.step} ahead is gone; the step cannot get its "
                            "noise. Restart from the last checkpoint, or build the engine with noise_ahead=None.")
                    shared.cond.wait(_WAIT_S)
                drawn = plan.drawn.pop(index)
                plan.held -= 8 * (stop - start)
                shared.cond.notify_all()
            if isinstance(drawn, BaseException):
                self._finish(plan)
                name = plan.requests[which][0]
                raise StepBoundaryError(
                    f"Drawing the noise of '{name}' for step {plan.step} ahead failed ({type(drawn).__name__}: "
                    f"{drawn}); the step takes no update without its noise. Restart from the last checkpoint; "
                    "PrivacyEngine(noise_ahead=None) draws the noise at the step instead."
                ) from drawn
            host_generator.add_scaled_(flat[start:stop], drawn)

    def _finish(self, plan: _Plan) -> None:
        shared = self._shared
        with shared.cond:
            self.last_peak_bytes = plan.peak
            plan.cancel()
            if shared.plan is plan:
                shared.plan = None
            shared.cond.notify_all()
