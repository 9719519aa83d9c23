"""``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``).

Its forward reads ``out_proj.weight`` without calling ``out_proj``, and with ``batch_first=False`` it
keeps the batch in dim 1, so neither the linear rule nor the torch.func fallback can see it. The
rule declares both (``children``, ``batch_size_of``) and recomputes the call once for the whole
batch, batch first, with the projections as explicit linear maps. Examples never mix in attention,
so one vector-Jacobian product of that recomputation gives every example's gradient at the
projections' outputs; each projection's per-example weight gradient is then the linear rule's outer
product of that gradient with the projection's input (ghost norm or materialised, per shape).

The recomputation follows ``F.multi_head_attention_forward``: boolean masks become -inf, a 2-D
``attn_mask`` is shared by the batch, a 3-D one is per (example, head), ``key_padding_mask`` is
added on top; ``bias_k``/``bias_v`` append a key and value (their per-example gradients come from a
per-example copy), ``add_zero_attn`` appends zeros. Attention dropout in training mode draws random
numbers that cannot be replayed: refused.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpscale.errors import UnsupportedModuleError
from dpscale.layers.rule import CallInputs, Rule
from dpscale.per_example import Dense, Outer, accumulation_dtype, param_shape

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _arguments(module: nn.Module, inputs: CallInputs) -> dict:
    bound = _SIGNATURE.bind(module, *inputs, **inputs.kwargs)
    bound.apply_defaults()
    return bound.arguments


def attention_batch_size(module: nn.MultiheadAttention, inputs: CallInputs) -> int | None:
    query = _arguments(module, inputs)["query"]
    if query.dim() != 3:
        return None  # unbatched (L, E)
    return query.shape[0 if module.batch_first else 1]


def _refuse_dropout(module: nn.MultiheadAttention) -> None:
    if module.training and module.dropout > 0:
        raise UnsupportedModuleError(
            f"nn.MultiheadAttention(dropout={module.dropout}) drops attention weights at random inside its "
            "forward, which dpscale cannot replay to get each example's gradient. Set its dropout to 0 "
            "(`attn.dropout = 0.0`; in nn.TransformerEncoderLayer/DecoderLayer: `layer.self_attn.dropout = 0.0` "
            "and `layer.multihead_attn.dropout = 0.0`; the layers' other dropouts can stay)."
        )


def validate_attention(module: nn.MultiheadAttention) -> None:
    _refuse_dropout(module)


def _mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: do not attend) as an additive float mask, as torch does."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def attention_grads(module: nn.MultiheadAttention, inputs: CallInputs, output_grad: tuple, names: tuple[str, ...]):
    _refuse_dropout(module)
    args = _arguments(module, inputs)
    batch_first = module.batch_first

    def first(x: Tensor) -> Tensor:  # [B, L, E] from the module's layout
        return x if batch_first else x.transpose(0, 1)

    grad_out = output_grad[0]
    grad_weights = output_grad[1] if len(output_grad) > 1 else None
    dtype = accumulation_dtype(args["query"], *(g for g in output_grad if g is not None))
    query, key, value = (first(args[n]).detach().to(dtype) for n in ("query", "key", "value"))
    batch, tgt_len, embed = query.shape
    heads, head_dim = module.num_heads, module.embed_dim // module.num_heads

    def param(name: str) -> Tensor | None:
        p = module.get_parameter(name) if _has(module, name) else None
        return None if p is None else p.detach().to(dtype)

    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = param("in_proj_weight").chunk(3)
    else:
        w_q, w_k, w_v = param("q_proj_weight"), param("k_proj_weight"), param("v_proj_weight")
    in_bias = param("in_proj_bias")
    b_q, b_k, b_v = (None, None, None) if in_bias is None else in_bias.chunk(3)

    with torch.enable_grad():
        q = F.linear(query, w_q, b_q).requires_grad_(True)
        k = F.linear(key, w_k, b_k).requires_grad_(True)
        v = F.linear(value, w_v, b_v).requires_grad_(True)
        appended = {}
        keys, values = k, v
        if module.bias_k is not None:
            for name in ("bias_k", "bias_v"):
                appended[name] = param(name).expand(batch, 1, embed).clone().requires_grad_(True)
            keys, values = torch.cat([keys, appended["bias_k"]], 1), torch.cat([values, appended["bias_v"]], 1)
        src_len = keys.shape[1]
        qh = q.reshape(batch, tgt_len, heads, head_dim).transpose(1, 2)
        kh = keys.reshape(batch, src_len, heads, head_dim).transpose(1, 2)
        vh = values.reshape(batch, src_len, heads, head_dim).transpose(1, 2)
        extra = int(module.bias_k is not None)
        if module.add_zero_attn:
            zeros = kh.new_zeros(batch, heads, 1, head_dim)
            kh, vh = torch.cat([kh, zeros], 2), torch.cat([vh, zeros], 2)
            extra += 1
        mask = _combined_mask(args, batch, heads, tgt_len, kh.shape[2], extra, dtype, query.device)
        scores = torch.matmul(qh * math.sqrt(1.0 / head_dim), kh.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)  # [B, H, L, S]
        mixed = torch.matmul(weights, vh).transpose(1, 2).reshape(batch, tgt_len, embed)
        out_weight = param("out_proj.weight")
        outputs, cotangents = [], []
        if grad_out is not None:
            # d loss / d mixed = G W_o: the out projection is linear, no graph needed.
            outputs.append(mixed)
            cotangents.append(first(grad_out).to(dtype) @ out_weight)
        if grad_weights is not None:
            outputs.append(weights.mean(1) if args["average_attn_weights"] else weights)
            cotangents.append(grad_weights.to(dtype))
        leaves = [q, k, v, *appended.values()]
        found = torch.autograd.grad(outputs, leaves, cotangents, allow_unused=True)
    grad_q, grad_k, grad_v, *grad_appended = (torch.zeros_like(t) if g is None else g for g, t in zip(found, leaves))

    out = {}
    projections = {"q": (grad_q, query), "k": (grad_k, key), "v": (grad_v, value)}
    if "in_proj_weight" in names:
        out["in_proj_weight"] = _packed(projections, args, param_shape(module.in_proj_weight))
    for short in ("q", "k", "v"):
        if f"{short}_proj_weight" in names:
            g, x = projections[short]
            out[f"{short}_proj_weight"] = Outer(
                left=g, right=x, m=g.shape[-1], shape=param_shape(module.get_parameter(f"{short}_proj_weight"))
            ).cheapest()
    if "in_proj_bias" in names:
        out["in_proj_bias"] = Dense(torch.cat([grad_q.sum(1), grad_k.sum(1), grad_v.sum(1)], -1))
    for name, g in zip(appended, grad_appended):
        if name in names:
            out[name] = Dense(g.reshape(batch, *param_shape(module.get_parameter(name))))
    if grad_out is not None and ("out_proj.weight" in names or "out_proj.bias" in names):
        g = first(grad_out)
        if "out_proj.weight" in names:
            out["out_proj.weight"] = Outer(
                left=g, right=mixed.detach(), m=g.shape[-1], shape=param_shape(module.out_proj.weight)
            ).cheapest()
        if "out_proj.bias" in names:
            out["out_proj.bias"] = Dense(g.to(dtype).sum(1))
    for name in names:  # the losses reach only part of the call: the rest has zero gradient
        if name not in out:
            out[name] = Dense(
                torch.zeros(batch, *param_shape(module.get_parameter(name)), dtype=dtype, device=query.device)
            )
    return out


def _has(module: nn.Module, name: str) -> bool:
    owner, _, attribute = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attribute, None) is not None


def _packed(projections: dict, args: dict, shape) -> Outer | Dense:
    """The packed [3E, E] in-projection: rows of q, k and v. Self-attention (query, key and value
    one tensor) is one outer product with the three gradients side by side; otherwise the three
    inputs are stacked along positions, each with its gradient in its own block of rows."""
    (g_q, x_q), (g_k, x_k), (g_v, x_v) = projections["q"], projections["k"], projections["v"]
    if args["query"] is args["key"] and args["key"] is args["value"]:
        return Outer(left=torch.cat([g_q, g_k, g_v], -1), right=x_q, m=shape[0], shape=shape).cheapest()
    grads = (g_q, g_k, g_v)
    left = g_q.new_zeros(g_q.shape[0], sum(g.shape[1] for g in grads), shape[0])
    row = column = 0
    for g in grads:
        left[:, row : row + g.shape[1], column : column + g.shape[2]] = g
        row, column = row + g.shape[1], column + g.shape[2]
    return Outer(left=left, right=torch.cat([x_q, x_k, x_v], 1), m=shape[0], shape=shape).cheapest()


def _combined_mask(
    args: dict, batch: int, heads: int, tgt_len: int, src_len: int, extra: int, dtype, device
) -> Tensor | None:
    """The additive mask [B or 1, H or 1, L, S] that torch applies; ``extra`` appended key columns
    (bias_k, zero attention) are never masked."""
    padding = _mask(args["key_padding_mask"], dtype)
    if args["is_causal"] and padding is None and not args["need_weights"]:
        # torch then ignores attn_mask (a hint of the causal mask) and applies the causal mask itself
        causal = torch.ones(tgt_len, src_len, dtype=torch.bool, device=device).tril()
        return _mask(~causal, dtype)[None, None]
    mask = _mask(args["attn_mask"], dtype)
    if mask is not None:
        mask = F.pad(mask, (0, extra))
        mask = mask[None, None] if mask.dim() == 2 else mask.reshape(batch, heads, tgt_len, src_len)
    if padding is not None:
        padding = F.pad(padding, (0, extra))[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return mask


def is_plain_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward


MULTIHEAD_ATTENTION = Rule(
    "multihead_attention", attention_grads, validate_attention, whole_call=True,
    batch_size_of=attention_batch_size, children=("out_proj",),
)
