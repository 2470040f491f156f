"""Attention over the KV cache for a mixed step (worker/engine/batch.py), for both forwards.

`attend()` takes the step's queries [T, heads, dim] of one layer (the new keys and values are
already in the cache) and returns the attention output [T, heads, dim]:

- decodes (the first n tokens) together: one query per sequence against its cached keys,
  padded to the longest, masked per sequence (length and, on sliding layers, window); or, with
  `--decode-attention flex` on the paged layout, in place over each sequence's own blocks
  (flex_decode.py);
- each prefill chunk against its own sequence: causal, offset by what is already cached.

The mask is built here from each sequence's length and the layer's window, never taken from
the model (transformers passes a hand-built 4-D mask through unchanged, which is how sliding
layers went wrong before). `softcap` (Gemma 2) caps scores before the mask, as transformers'
eager attention does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from chatstream_cluster.worker.engine.batch import ForwardBatch


def attend(
    kv: Any,
    layer: int,
    q: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention output [T, heads, dim] for queries q [T, heads, dim] of `layer`."""
    if not batch.segments:
        return _decode(kv, layer, q, batch, scale, window, softcap)
    out = torch.empty_like(q)
    n = batch.n_dec
    if n:
        out[:n] = _decode(kv, layer, q[:n], batch, scale, window, softcap)
    for seg in batch.segments:
        k, v = kv.segment_kv(layer, seg)
        out[seg.offset : seg.offset + seg.n] = _prefill(
            q[seg.offset : seg.offset + seg.n], k, v, seg.start, scale, window, softcap
        )
    return out


def _decode(kv, layer, q, batch, scale, window, softcap) -> torch.Tensor:  # noqa: ANN001
    """One query per decoding sequence, against k/v [R, kv_heads, L, dim] viewed by the cache
    (R > n when the cache views rows of sequences that are not decoding: their queries are 0),
    or in place through flex_attention (flex_decode.py) when the cache has it."""
    if kv.flex is not None:
        return kv.flex.attend(layer, q, batch, scale, window, softcap)
    k, v = kv.decode_kv(layer, batch)
    rows, kv_heads, length, dim = k.shape
    heads = q.shape[1]
    if batch.dec_scatter is not None:
        full = q.new_zeros(rows, heads, dim)
        full[batch.dec_scatter] = q
        q = full
    bias = _decode_bias(batch, window, length, q.dtype)  # [R, L], 0 or -inf
    group = heads // kv_heads
    if q.device.type == "cpu" or softcap is not None:
        # Query heads grouped per KV head: GQA without repeating K/V; on CPU a quarter faster
        # than SDPA's kernel at batch 16.
        qg = q.reshape(rows * kv_heads, group, dim)
        kf = k.reshape(rows * kv_heads, length, dim)
        vf = v.reshape(rows * kv_heads, length, dim)
        b = bias[:, None, None, :].expand(rows, kv_heads, 1, length).reshape(-1, 1, length)
        if softcap is None:
            scores = torch.baddbmm(b, qg, kf.transpose(1, 2), alpha=scale)
        else:
            scores = torch.bmm(qg, kf.transpose(1, 2)).mul_(scale / softcap).tanh_()
            scores = scores.mul_(softcap).add_(b)
        if scores.dtype == torch.float32:
            probs = scores.softmax(-1)
        else:
            probs = scores.softmax(-1, dtype=torch.float32).to(v.dtype)
        out = torch.bmm(probs, vf).view(rows, heads, dim)
    else:
        out = F.scaled_dot_product_attention(
            q[:, :, None], k, v, attn_mask=bias[:, None, None, :], scale=scale,
            enable_gqa=group > 1,
        )[:, :, 0]
    if batch.dec_scatter is not None:
        out = out[batch.dec_scatter]
    return out


def _decode_bias(batch: ForwardBatch, window: int | None, length: int, dtype) -> torch.Tensor:  # noqa: ANN001
    """Additive mask [R, L] for the viewed rows: a row of length c sees columns 0..c-1, and
    on a sliding layer only the last `window` of them. Built once per step and window."""
    key = ("decode", window, dtype)
    bias = batch.masks.get(key)
    if bias is None:
        ctx = batch.dec_view_ctx
        cols = torch.arange(length, device=ctx.device)
        hidden = cols[None, :] >= ctx[:, None]
        if window is not None:
            hidden |= cols[None, :] < (ctx[:, None] - window)
        bias = torch.zeros(hidden.shape, dtype=dtype, device=ctx.device)
        bias.masked_fill_(hidden, float("-inf"))
        batch.masks[key] = bias
    return bias


def _prefill(q, k, v, start, scale, window, softcap) -> torch.Tensor:  # noqa: ANN001
    """A chunk's queries q [n, heads, dim] at positions start.. against its sequence's
    k/v [kv_heads, ctx, dim] (the chunk's own keys included)."""
    n, heads, dim = q.shape
    kv_heads, ctx = k.shape[0], k.shape[1]
    qh = q.transpose(0, 1)[None]  # [1, heads, n, dim]
    full_causal = start == 0 and (window is None or window >= ctx)
    mask = None
    if not full_causal:
        rows = torch.arange(start, start + n, device=q.device)[:, None]
        cols = torch.arange(ctx, device=q.device)[None, :]
        mask = cols <= rows
        if window is not None:
            mask &= cols > rows - window
    if softcap is None:
        bias = None
        if mask is not None:  # additive: CPU's SDPA kernel runs ~1.6x faster than with a bool
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            qh, k[None], v[None], attn_mask=bias, is_causal=full_causal, scale=scale,
            enable_gqa=kv_heads != heads,
        )
        return out[0].transpose(0, 1)
    group = heads // kv_heads
    kr = k.repeat_interleave(group, dim=0) if group > 1 else k
    vr = v.repeat_interleave(group, dim=0) if group > 1 else v
    scores = torch.matmul(qh[0].float(), kr.float().transpose(1, 2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).to(v.dtype)
    return torch.matmul(probs, vr).transpose(0, 1)
