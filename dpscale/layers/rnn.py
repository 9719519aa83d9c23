"""``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``: any number of layers, bidirectional, ``batch_first`` either
way, an LSTM's ``proj_size``.

Every parameter of a recurrent layer enters through a linear map applied at each time step:
``W_ih x_t + b_ih`` and ``W_hh h_{t-1} + b_hh`` (and an LSTM's projection ``W_hr``). Given the
gradient of those pre-activations at every step, an example's weight gradient is a sum over steps
of outer products, the linear rule's form. The fused kernel hides the pre-activations, so the rule
recomputes the layer once for the whole batch, unrolled step by step with torch's cell equations,
and takes one vector-Jacobian product to the pre-activations: examples never mix in a recurrent
layer, so each example's row is its own gradient.

The final states ``h_n`` (and ``c_n``) keep the batch in dim 1 whatever ``batch_first`` says; the
rule declares where the batch is (``batch_size_of``). Dropout between layers (``dropout > 0`` in
training mode) draws random numbers inside the fused kernel that cannot be replayed: refused, as
are packed sequences (pad the batch instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from dpscale.errors import UnsupportedModuleError
from dpscale.layers.rule import CallInputs, Rule
from dpscale.per_example import Dense, Outer, accumulation_dtype, param_shape


def _input(inputs: CallInputs):
    return inputs[0] if inputs else inputs.kwargs["input"]


def _hx(inputs: CallInputs):
    return inputs[1] if len(inputs) > 1 else inputs.kwargs.get("hx")


def recurrent_batch_size(module: nn.RNNBase, inputs: CallInputs) -> int | None:
    x = _input(inputs)
    if isinstance(x, PackedSequence):
        raise UnsupportedModuleError(
            f"nn.{type(module).__name__} was called on a PackedSequence; dpscale trains recurrent layers on "
            "padded batches only. Pass the padded tensor (torch.nn.utils.rnn.pad_sequence) and read each "
            "sequence's output at its own last position."
        )
    if x.dim() != 3:
        return None  # unbatched (T, D)
    return x.shape[0 if module.batch_first else 1]


def _refuse_dropout(module: nn.RNNBase) -> None:
    if module.training and module.dropout > 0 and module.num_layers > 1:
        name = type(module).__name__
        raise UnsupportedModuleError(
            f"nn.{name}(dropout={module.dropout}) drops activations between its layers at random inside one "
            "fused kernel, which dpscale cannot replay to get each example's gradient. Build it with dropout=0; "
            f"for dropout between layers, stack single-layer nn.{name} modules with nn.Dropout between them."
        )


def validate_recurrent(module: nn.RNNBase) -> None:
    _refuse_dropout(module)


def _cell(mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None):
    """One step of torch's cell equations from the two pre-activations: (h_t before any projection, c_t)."""
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    pre = gi + gh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def recurrent_grads(module: nn.RNNBase, inputs: CallInputs, output_grad: tuple, names: tuple[str, ...]):
    _refuse_dropout(module)
    mode, layers = module.mode, module.num_layers
    directions = 2 if module.bidirectional else 1
    hidden, proj = module.hidden_size, getattr(module, "proj_size", 0)
    dtype = accumulation_dtype(_input(inputs), *(g for g in output_grad if g is not None))
    x = _input(inputs).detach().to(dtype)
    x = x if module.batch_first else x.transpose(0, 1)  # [B, T, D]
    batch, steps = x.shape[:2]
    hx = _hx(inputs)
    h0, c0 = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (None, None)
    width = proj or hidden

    def weight(name: str) -> Tensor | None:
        """A stand-in that puts the recomputation on a graph (its own gradient is never asked for)."""
        p = getattr(module, name, None)
        return None if p is None else p.detach().to(dtype).requires_grad_(True)

    factors = {}  # "ih_l0" -> (pre-activations whose gradient to ask for, the matching inputs)
    finals_h, finals_c = [], []
    with torch.enable_grad():
        layer_input = x
        for layer in range(layers):
            outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                index = layer * directions + direction
                h = x.new_zeros(batch, width) if h0 is None else h0[index].detach().to(dtype)
                c = x.new_zeros(batch, hidden) if c0 is None else c0[index].detach().to(dtype)
                gi = F.linear(layer_input, weight("weight_ih" + suffix), weight("bias_ih" + suffix))
                w_hh, b_hh, w_hr = (
                    weight("weight_hh" + suffix), weight("bias_hh" + suffix), weight("weight_hr" + suffix)
                )
                order = range(steps - 1, -1, -1) if direction else range(steps)
                gh_steps, h_inputs, r_steps, projected = [], [], [], []
                states = [None] * steps
                for t in order:
                    gh = F.linear(h, w_hh, b_hh)
                    gh_steps.append(gh)
                    h_inputs.append(h.detach())
                    h, c = _cell(mode, gi[:, t], gh, h, c)
                    if w_hr is not None:
                        r_steps.append(h.detach())
                        h = F.linear(h, w_hr)
                        projected.append(h)
                    states[t] = h
                outputs.append(torch.stack(states, 1))
                finals_h.append(h)
                finals_c.append(c)
                factors["ih" + suffix] = (gi, layer_input.detach())
                factors["hh" + suffix] = (gh_steps, torch.stack(h_inputs, 1))
                if w_hr is not None:
                    factors["hr" + suffix] = (projected, torch.stack(r_steps, 1))
            layer_input = torch.cat(outputs, -1) if directions > 1 else outputs[0]
        output = layer_input if module.batch_first else layer_input.transpose(0, 1)
        results = [output, torch.stack(finals_h)] + ([torch.stack(finals_c)] if mode == "LSTM" else [])
        pairs = [(r, g.to(dtype)) for r, g in zip(results, output_grad) if g is not None]
        # gi is one [B, T, rows] tensor; the others are one [B, rows] tensor per step
        asked = [t for tensors, _ in factors.values() for t in ([tensors] if isinstance(tensors, Tensor) else tensors)]
        found = torch.autograd.grad([r for r, _ in pairs], asked, [g for _, g in pairs], allow_unused=True)
    found = [torch.zeros_like(t) if g is None else g for g, t in zip(found, asked)]

    out, position = {}, 0
    for key, (tensors, right) in factors.items():
        if isinstance(tensors, Tensor):
            left, position = found[position], position + 1
        else:
            left, position = torch.stack(found[position : position + len(tensors)], 1), position + len(tensors)
        kind, suffix = key[:2], key[2:]
        if f"weight_{kind}{suffix}" in names:
            p = module.get_parameter(f"weight_{kind}{suffix}")
            out[f"weight_{kind}{suffix}"] = Outer(
                left=left, right=right, m=left.shape[-1], shape=param_shape(p)
            ).cheapest()
        if f"bias_{kind}{suffix}" in names:
            out[f"bias_{kind}{suffix}"] = Dense(left.sum(1))
    return out


def is_plain_recurrent(module: nn.Module) -> bool:
    """nn.RNN, nn.LSTM, nn.GRU, and subclasses that keep their forward."""
    return isinstance(module, nn.RNNBase) and type(module).forward in (nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward)


RECURRENT = Rule("recurrent", recurrent_grads, validate_recurrent, whole_call=True, batch_size_of=recurrent_batch_size)
