"""The tape: forward hooks that record, for every call of a module owning trainable parameters,
what its per-example gradient needs (the input activation and a handle on the output's gradient).

It keeps references, never copies: the activations are the ones autograd saves anyway. The output
is recorded as a gradient edge (``torch.autograd.graph.get_gradient_edge``), so the engine's one
backward pass can ask autograd for the gradient of exactly that value, even if the model later
modifies the output in place, without holding the output tensor alive.

Batch semantics are settled here, where the shapes are seen:

* the batch size B is read from the model's own inputs when its forward starts;
* a call whose input has leading size 1 while B > 1 (GPT-2's ``position_ids`` of shape [1, T]) is
  broadcast over the batch: its input and output are expanded to B (a view, no copy) so the output
  gradient arrives per example;
* a call whose input has no batch dimension at all (T5's relative-position bias looks up a [T, T]
  bucket table) cannot yield per-example gradients by itself: its parameters are delegated to the
  nearest enclosing module whose inputs do carry the batch, and that module's call is recorded
  whole for the registry's default rule (the torch.func fallback), which recomputes it per example;
* a rule that declares where its module keeps the batch (``Rule.batch_size_of``: recurrent layers
  and attention with ``batch_first=False`` keep it in dim 1) is exempt from all of the above: its
  call is recorded as it is, after a check that it carries the model's B examples.

Every call is recorded the same way, as a ``ModuleCall`` that its rule reads; the engine calls
each call's rule without knowing which kind of rule it is.

A call read by a rule of its first input (every built-in rule but the whole-call ones) is run
*eagerly*: its output passes through ``_RuleOnGradient``, an identity whose backward hands the
output's gradient, as soon as autograd computes it, to the engine, which runs the rule there and
keeps only what the rule returns (the cheapest exact form: per-example gradients where they are
small, as for LoRA factors and biases, or the input and output gradient for ghost norms). The
input is held as that identity's saved tensor, not by the tape, so it is released as soon as the
rule has run, and under activation checkpointing it is dropped after the forward and rebuilt in the
backward like every other saved tensor. The identity returns an alias of the output, not a view, so
the model may still modify the output in place (autograd's version counter guards the values,
as without DP). The gradient reaches the anchor, a scalar of each forward that every such identity
takes as an input; the engine asks autograd for the anchor's gradient (always None) and for the
output edges of the other calls, so autograd runs every identity without keeping their gradients.

Activation checkpointing (``torch.utils.checkpoint`` with ``use_reentrant=False``, which Hugging
Face's ``gradient_checkpointing_enable()`` uses by default) runs the forward once with autograd on:
the calls inside a checkpointed region are recorded then, like any other, and their output edges
are the ones the backward differentiates. The recomputation inside the backward fires the hooks
again; the engine runs its backward under ``replaying()``, which throws those records away. What
stays referenced from the forward are the inputs of whole-call rules (the torch.func fallback,
recurrent and attention modules) inside checkpointed regions.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten

from dpscale.errors import UnsupportedModuleError
from dpscale.layers.rule import CallInputs, Rule


@dataclass(frozen=True)
class Owner:
    """A module that owns trainable parameters directly, and the rule that differentiates it."""

    module: nn.Module
    qualname: str
    rule: Rule
    local_names: tuple[str, ...]
    global_names: tuple[str, ...]
    through_parent: bool = False  # always differentiated through an enclosing module


@dataclass
class ModuleCall:
    """One recorded call, as its rule reads it: ``rule.grads(module, inputs, output_grad(grads),
    names)`` gives per-example gradients of ``names`` (relative to ``module``), which are the
    model's ``global_names``. ``edges`` are the gradient edges of the output leaves the rule
    reads, at positions ``leaf_indices`` among the ``leaf_count`` leaves of the flattened output.

    An eager call has no edges: its rule runs inside the backward as its output's gradient
    arrives, and ``inputs`` holds ``SAVED_INPUT`` where the first input, kept as a saved tensor,
    goes."""

    module: nn.Module
    qualname: str
    rule: Rule
    inputs: CallInputs
    edges: tuple[GradientEdge, ...]
    leaf_indices: tuple[int, ...]
    leaf_count: int
    names: tuple[str, ...]
    global_names: tuple[str, ...]
    seq: int
    batch_dim: int = 0  # where the recorded output keeps the batch; the rule reads it in dim 0
    eager: bool = False
    dropped: bool = False  # covered by an enclosing whole call: its gradient is not needed

    def output_grad(self, grads: list[Tensor | None]) -> Any:
        """The gradients of ``edges`` as the rule reads them: one tensor, or for a whole-call rule
        one entry per output leaf (None where the leaf is not differentiable or not reached)."""
        per_leaf: list[Tensor | None] = [None] * self.leaf_count
        for index, grad in zip(self.leaf_indices, grads):
            per_leaf[index] = grad if grad is None or not self.batch_dim else grad.transpose(0, self.batch_dim)
        return tuple(per_leaf) if self.rule.whole_call else per_leaf[0]


SAVED_INPUT = object()  # stands for an eager call's first input until the backward unpacks it

OnOutputGrad = Callable[[ModuleCall, Tensor, tuple], None]


class _RuleOnGradient(torch.autograd.Function):
    """Identity on a recorded output; its backward passes the output's gradient and the saved
    first input to the tape's ``on_output_grad`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, anchor: Tensor, target: tuple, output: Tensor, *saved: Tensor) -> Tensor:
        ctx.target = target
        ctx.save_for_backward(*saved)
        return output.detach()  # an alias, not a view: in-place use of the output stays allowed

    @staticmethod
    def backward(ctx, grad: Tensor):
        tape, call = ctx.target
        if not tape.in_engine_backward:  # refused, or (paused) passed through without the rule
            tape.refuse_outside_engine_backward(call.qualname)
            return (None, None, grad) + (None,) * len(ctx.saved_tensors)
        saved = ctx.saved_tensors  # once: checkpointing lets each saved tensor be unpacked once
        if not call.dropped:
            tape._on_output_grad(call, grad, saved)
        return (None, None, grad) + (None,) * len(saved)


@dataclass
class _Frame:
    module: nn.Module
    qualname: str
    args: tuple
    kwargs: dict
    seq: int
    delegated: dict[str, str] = field(default_factory=dict)  # relative name -> global name
    rule: Rule | None = None  # the owner's own whole-call rule; None: the tape's default
    batch_dim: int = 0  # where this call's tensors keep the batch (declared by an enclosing module)
    inner_batch_dim: int = 0  # where its descendants' tensors keep it
    declared: bool = False  # the rule reads its call's batch layout itself (Rule.batch_size_of)


def leading_sizes(tree: Any) -> list[int]:
    leaves, _ = tree_flatten(tree)
    return [leaf.shape[0] for leaf in leaves if isinstance(leaf, Tensor) and leaf.dim() > 0]


def infer_batch_size(args: tuple, kwargs: dict) -> int | None:
    """The model's batch size: the largest leading size among its multi-dimensional tensor inputs
    (input_ids, attention_mask, pixel_values); 1-D inputs (labels) only if there is nothing else.
    A broadcast input such as position_ids [1, T] never wins over a real batch."""
    leaves, _ = tree_flatten((args, kwargs))
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor) and leaf.dim() > 0]
    matrices = [t.shape[0] for t in tensors if t.dim() > 1]
    sizes = matrices or [t.shape[0] for t in tensors]
    return max(sizes) if sizes else None


class Tape:
    """Owned by one engine; ``detach()`` removes every hook it installed. ``default`` (the
    registry's default rule, reading whole calls) differentiates the calls that carry delegated
    parameters and those their own rule cannot read."""

    def __init__(
        self, model: nn.Module, owners: list[Owner], default: Rule,
        batch_dim_inside: Callable[[nn.Module], int | None] = lambda module: None,
        on_output_grad: OnOutputGrad | None = None,
        on_foreign_backward: Callable[[str], None] | None = None,
    ) -> None:
        self._model = model
        self._default = default
        self._batch_dim_inside = batch_dim_inside
        self._on_output_grad = on_output_grad
        self._on_foreign_backward = on_foreign_backward
        self.anchor: Tensor | None = None  # this forward's; see the module docstring
        self._owners = {id(owner.module): owner for owner in owners}
        self._qualnames = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
        self.batch_size: int | None = None
        self.calls: list[ModuleCall] = []
        self._frames: list[_Frame] = []
        self._replays: dict[int, list[_Frame]] | None = None  # per thread, while replaying
        self._seq = 0
        self.forward = 0  # the number of the latest forward pass, stamped on what it records
        self.stamp = object()  # this tape's key in Node.metadata (dpscale.loss_graph reads it)
        self._paused = False
        self._takes_use_cache = "use_cache" in inspect.signature(model.forward).parameters
        self._handles = []
        watched = _modules_above(model, [owner.module for owner in owners])
        for module in watched:
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True, always_call=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.calls = []
        self._frames.clear()

    @property
    def _stack(self) -> list[_Frame]:
        """The open calls: the forward's, or while replaying, the replaying thread's own (on GPUs
        autograd runs each device's backward, and so its recomputations, on a thread of its own)."""
        if self._replays is None:
            return self._frames
        return self._replays.setdefault(threading.get_ident(), [])

    @property
    def in_engine_backward(self) -> bool:
        return self._replays is not None

    def refuse_outside_engine_backward(self, qualname: str) -> None:
        """As a gradient reaches a recorded output, before autograd reaches the module's weights: a
        backward other than the engine's is refused (``dpscale.gradient_guard``). While paused
        (analysis with ``torch.autograd.grad``, which writes no ``p.grad``) it passes."""
        if self._on_foreign_backward is not None and not self.in_engine_backward and not self._paused:
            self._on_foreign_backward(qualname)

    @contextmanager
    def replaying(self):
        """Around the engine's backward (what tells the engine's backward from any other). Non-reentrant
        activation checkpointing re-runs the forward of each checkpointed region inside the backward, to
        rebuild the tensors it did not keep, and that fires these hooks again. The re-run must compute
        what the first run computed (a broadcast output expanded to the batch is expanded again, or the
        rebuilt tensors would not match the ones they replace), so the hooks run as in the forward, but
        on their own frames, and what they record is thrown away: the backward differentiates the calls
        of the first forward, each once. (Without checkpointing nothing runs forward in there.) A replay
        starts with no enclosing frames: a region cut inside a module whose calls need their enclosing
        call (batch-less calls differentiated through a parent, a parent keeping the batch in dim 1)
        replays without it, and fails loudly (our error, or torch's check of the recomputed shapes)
        rather than differentiating anything else."""
        calls, replays = self.calls, self._replays
        self.calls, self._replays = [], {}
        try:
            yield
        finally:
            self.calls, self._replays = calls, replays

    @contextmanager
    def paused(self):
        """The engine's own recomputations (the torch.func fallback, the RMS-norm rule) run the
        model's modules again; they must not be recorded."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def take(self) -> list[ModuleCall]:
        calls, self.calls = self.calls, []
        return calls

    # hooks -------------------------------------------------------------------------------------

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._paused:
            return
        changed = None
        if module is self._model:
            self._stack.clear()
            self.calls = []
            self.batch_size = infer_batch_size(args, kwargs) if torch.is_grad_enabled() else None
            self.forward += 1
            if self._replays is None:  # a replayed whole-model forward keeps the forward's anchor
                self.anchor = torch.zeros((), requires_grad=True)
            if self.batch_size is not None and self._takes_use_cache and kwargs.get("use_cache") is not False:
                # A KV cache means nothing in a training step, and recomputing a module per example
                # (torch.func fallback) would write into it: training forwards run without one.
                kwargs = {**kwargs, "use_cache": False}
                changed = (args, kwargs)
        if not torch.is_grad_enabled() or self.batch_size is None:
            return changed
        self._seq += 1
        frame = _Frame(module, self._qualnames.get(id(module), ""), args, kwargs, self._seq)
        frame.batch_dim = self._stack[-1].inner_batch_dim if self._stack else 0
        declared = self._batch_dim_inside(module)
        frame.inner_batch_dim = frame.batch_dim if declared is None else declared
        self._stack.append(frame)
        return changed

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._paused or not self._stack or self._stack[-1].module is not module:
            return None
        frame = self._stack.pop()
        if output is None and sys.exc_info()[0] is not None:
            # Its forward raised (the hooks are always called). Checkpointing stops a replay this
            # way once it has rebuilt the tensors it needs: a call cut short records nothing (it
            # used to be recorded whole, holding its inputs until the backward ended).
            return None
        new_output = None
        owner = self._owners.get(id(module))
        if owner is not None:
            new_output = self._record_owner(owner, frame, args, output)
        if frame.delegated:
            whole = self._record_whole(frame, output if new_output is None else new_output)
            new_output = new_output if whole is None else whole
        return new_output

    # recording ----------------------------------------------------------------------------------

    def _record_owner(self, owner: Owner, frame: _Frame, args: tuple, output: Any) -> Any:
        batch = self.batch_size
        if owner.through_parent:
            self._delegate(owner, self._stack)
            return None
        if owner.rule.batch_size_of is not None:
            return self._record_declared(owner, frame, args, output)
        if owner.rule.whole_call:
            if self._carries_batch(frame):
                frame.rule = owner.rule
                frame.delegated.update(zip(owner.local_names, owner.global_names))
            else:
                self._delegate(owner, self._stack)
            return None
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            # Called in a way the rule does not read: the default rule differentiates the call.
            frame.delegated.update(zip(owner.local_names, owner.global_names))
            return None
        if not output.requires_grad:
            return None
        x = args[0]
        if frame.batch_dim:  # an enclosing module keeps the batch in dim 1 (batch_first=False)
            dim = frame.batch_dim
            if x.dim() > dim and x.shape[dim] == batch and output.dim() > dim and output.shape[dim] == batch:
                inputs = CallInputs((x.transpose(0, dim),) + tuple(args[1:]), frame.kwargs)
                return self._append(owner, inputs, output, frame.seq, batch_dim=dim)
            else:
                self._delegate(owner, self._stack)
            return None
        lead = x.shape[0] if x.dim() else None
        if lead == batch and output.dim() and output.shape[0] == batch:
            return self._append(owner, CallInputs(args, frame.kwargs), output, frame.seq)
        if lead == 1 and batch > 1 and output.dim() and output.shape[0] == 1:
            output = output.expand(batch, *output.shape[1:])
            inputs = (x.expand(batch, *x.shape[1:]),) + tuple(args[1:])
            return self._append(owner, CallInputs(inputs, frame.kwargs), output, frame.seq)
        self._delegate(owner, self._stack)
        return None

    def _record_declared(self, owner: Owner, frame: _Frame, args: tuple, output: Any) -> Any:
        """A rule that says where its call keeps the batch (``Rule.batch_size_of``): recorded as it
        is, once its number of examples is the model's."""
        inputs = CallInputs(args, frame.kwargs)
        size = owner.rule.batch_size_of(owner.module, inputs)
        if size != self.batch_size:
            found = "inputs without a batch dimension" if size is None else f"a batch of {size} examples"
            raise UnsupportedModuleError(
                f"Module '{owner.qualname}' ({type(owner.module).__name__}) was called on {found}, but the "
                f"model's inputs carry {self.batch_size} examples; per-example gradients need each example "
                "to pass through it on its own row of the batch. Call it on the whole batch, or freeze its "
                "parameters (requires_grad=False)."
            )
        if owner.rule.whole_call:
            frame.rule = owner.rule
            frame.declared = True
            frame.delegated.update(zip(owner.local_names, owner.global_names))
        elif isinstance(output, Tensor) and output.requires_grad:
            return self._append(owner, inputs, output, frame.seq)
        return None

    def _edge(self, output: Tensor) -> GradientEdge:
        """The gradient edge of a recorded output, its node stamped with this forward's number (so
        that losses mixing two forwards are recognised: ``dpscale.loss_graph``)."""
        edge = get_gradient_edge(output)
        edge.node.metadata[self.stamp] = self.forward
        return edge

    def _append(self, owner: Owner, inputs: CallInputs, output: Tensor, seq: int, batch_dim: int = 0) -> Tensor:
        """Record the call; returns the output the model goes on with (the eager identity's)."""
        if owner.rule.input_free.issuperset(owner.local_names):
            inputs = CallInputs()  # its gradients need the output gradient alone: keep no activation
        eager = self._on_output_grad is not None and self.anchor is not None
        saved: tuple = ()
        if eager and inputs and isinstance(inputs[0], Tensor):
            saved = (inputs[0],)
            inputs = CallInputs((SAVED_INPUT,) + tuple(inputs[1:]), inputs.kwargs)
        edge = self._edge(output)  # stamped either way (dpscale.loss_graph); an eager call keeps no edge
        call = ModuleCall(
            owner.module, owner.qualname, owner.rule, inputs, edges=() if eager else (edge,),
            leaf_indices=(0,), leaf_count=1, names=owner.local_names, global_names=owner.global_names, seq=seq,
            batch_dim=batch_dim, eager=eager,
        )
        self.calls.append(call)
        if eager:
            return _RuleOnGradient.apply(self.anchor, (self, call), output, *saved)
        self._guard(edge, owner.qualname)
        return output

    def _guard(self, edge: GradientEdge, qualname: str) -> None:
        """A gradient reaching a recorded output outside the engine's backward is refused before
        the node that computes its module's weight gradient runs (eager calls: in their identity)."""
        if self._on_foreign_backward is not None:
            edge.node.register_prehook(lambda grad_outputs: self.refuse_outside_engine_backward(qualname))

    def _carries_batch(self, frame: _Frame) -> bool:
        return self.batch_size in leading_sizes((frame.args, frame.kwargs))

    def _delegate(self, owner: Owner, frames: list[_Frame]) -> None:
        """Hand the owner's parameters to the nearest enclosing call that carries the batch."""
        for frame in reversed(frames):
            if frame.module is self._model and not self._carries_batch(frame):
                break
            if self._carries_batch(frame):
                prefix = frame.qualname + "." if frame.qualname else ""
                if not owner.qualname.startswith(prefix):
                    break
                relative = owner.qualname[len(prefix) :]
                for local, global_name in zip(owner.local_names, owner.global_names):
                    frame.delegated[f"{relative}.{local}" if relative else local] = global_name
                return
        raise UnsupportedModuleError(
            f"Module '{owner.qualname}' ({type(owner.module).__name__}) was called with inputs that carry no "
            f"batch dimension (batch size {self.batch_size}) and no enclosing module's inputs do either, so "
            "per-example gradients of its parameters are undefined here. Freeze its parameters "
            "(requires_grad=False) or register a rule for the enclosing module."
        )

    def _record_whole(self, frame: _Frame, output: Any) -> Any:
        """Record the frame's call whole, for the parameters gathered in ``frame.delegated``; calls
        recorded inside it for those parameters are dropped (this call covers them)."""
        batch = self.batch_size
        leaves, spec = tree_flatten(output)
        indices, edges = [], []
        changed = False
        for i, leaf in enumerate(leaves):
            if not (isinstance(leaf, Tensor) and leaf.requires_grad and leaf.is_floating_point()):
                continue
            if frame.declared:  # the rule reads the layout of every output leaf itself
                indices.append(i)
                edges.append(self._edge(leaf))
                continue
            if leaf.dim() and leaf.shape[0] == 1 and batch > 1:
                leaf = leaves[i] = leaf.expand(batch, *leaf.shape[1:])
                changed = True
            if not leaf.dim() or leaf.shape[0] != batch:
                raise UnsupportedModuleError(
                    f"Module '{frame.qualname}' ({type(frame.module).__name__}) returns an output of shape "
                    f"{tuple(leaf.shape)} with no batch dimension (batch size {batch}); its per-example "
                    "gradients cannot be separated. Freeze the parameters it owns or register a rule for it."
                )
            indices.append(i)
            edges.append(self._edge(leaf))
        for edge in edges:
            self._guard(edge, frame.qualname)
        delegated = set(frame.delegated.values())
        kept = []
        for call in self.calls:
            overlap = delegated.intersection(call.global_names)
            if call.seq > frame.seq and overlap:
                if overlap != set(call.global_names):
                    raise UnsupportedModuleError(
                        f"Parameters {sorted(overlap)} are shared between a call inside '{frame.qualname}' "
                        "and other parameters; dpscale cannot split this call. Register a rule for "
                        f"{type(frame.module).__name__}."
                    )
                call.dropped = True
                continue
            kept.append(call)
        self.calls = kept
        self.calls.append(
            ModuleCall(
                frame.module, frame.qualname, frame.rule or self._default, CallInputs(frame.args, frame.kwargs),
                edges=tuple(edges), leaf_indices=tuple(indices), leaf_count=len(leaves),
                names=tuple(frame.delegated), global_names=tuple(frame.delegated.values()), seq=frame.seq,
            )
        )
        return tree_unflatten(leaves, spec) if changed else None


def _modules_above(model: nn.Module, owners: list[nn.Module]) -> list[nn.Module]:
    """The model's modules that contain an owner (owners included), each once, and the root."""
    owner_ids = {id(m) for m in owners}
    watched, seen = [], set()

    def visit(module: nn.Module) -> bool:
        contains = id(module) in owner_ids
        for child in module.children():
            contains = visit(child) or contains
        if (contains or module is model) and id(module) not in seen:
            seen.add(id(module))
            watched.append(module)
        return contains

    visit(model)
    return watched

