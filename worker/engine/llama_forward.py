"""LlamaFastForward: the Llama forward pass (llama, mistral, qwen2) restated for serving.

It reads the HF model's weights in place and runs the same math with far fewer operator calls,
which is what a small model's decode step costs on CPU (and kernel launches on GPU):

- q/k/v and gate/up projections are fused into one matmul each (`_fuse`: the HF modules then
  view the fused tensors, no extra memory); residual adds ride on `addmm`;
- rotary embedding uses cos/sin tables built once from the model's own rotary module, and is
  applied to queries and keys together, in place, in 4 calls per layer;
- a step's tokens (decodes and prefill chunks, worker/engine/batch.py) run through every
  projection together; attention and the KV cache are worker/engine/attention.py's, with each
  layer's sliding window from the config.

Only plain float `nn.Linear` weights qualify: a quantized checkpoint's packed weights must never
be concatenated as if they were plain (`supports_fast_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from chatstream_cluster.worker.engine.attention import attend
from chatstream_cluster.worker.engine.batch import ForwardBatch
from chatstream_cluster.worker.engine.hf_model import is_quantized, layer_windows

DYNAMIC_ROPE = ("dynamic", "longrope")  # their frequencies depend on the sequence length
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def supports_fast_forward(model: Any) -> bool:
    """Llama-shaped decoder (llama, mistral, qwen2) with plain float weights."""
    config = model.config
    if config.model_type not in ("llama", "mistral", "qwen2") or is_quantized(model):
        return False
    base = getattr(model, "model", None)
    if base is None or not len(base.layers) or not hasattr(base, "embed_tokens"):
        return False
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "q_norm"):
            return False
        for name in LINEARS:
            module = getattr(attn, name, None) or getattr(mlp, name, None)
            if type(module) is not torch.nn.Linear or not module.weight.is_floating_point():
                return False
    return True


@dataclass
class _FastLayer:
    """One decoder layer's weights; projection weights are stored transposed ([in, out] views
    of the HF weights) so each matmul is one call."""

    w_in: torch.Tensor
    eps_in: float
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    w_post: torch.Tensor
    eps_post: float
    wgu: torch.Tensor
    bgu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None


class LlamaFastForward:
    """`forward(batch, kv)`: a mixed step over a Llama-shaped HF model; logits of the sampled
    tokens [m, vocab]."""

    def __init__(self, model: Any, max_len: int):
        base = model.model
        attn = base.layers[0].self_attn
        config = model.config
        self.embed = base.embed_tokens.weight
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        self.hidden = self.embed.shape[1]
        self.norm, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.head = model.lm_head.weight
        self.rotary = base.rotary_emb
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.windows = layer_windows(config)
        self.inter = base.layers[0].mlp.gate_proj.out_features
        self.act = base.layers[0].mlp.act_fn
        if getattr(config, "hidden_act", None) in ("silu", "swish"):
            self.act = F.silu  # the same function without a Module call
        on_cpu = self.device.type == "cpu"

        def t(weight: torch.Tensor) -> torch.Tensor:
            # CPU GEMV is ~25 % faster on a contiguous [in, out] copy than on a transposed
            # view (measured with torch.mm at batch 1); on CUDA the view costs nothing.
            return weight.t().contiguous() if on_cpu else weight.t()

        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            wqkv, bqkv = _fuse([a.q_proj, a.k_proj, a.v_proj])
            wgu, bgu = _fuse([m.gate_proj, m.up_proj])
            self.layers.append(
                _FastLayer(
                    layer.input_layernorm.weight,
                    layer.input_layernorm.variance_epsilon,
                    t(wqkv),
                    bqkv,
                    t(a.o_proj.weight),
                    a.o_proj.bias,
                    layer.post_attention_layernorm.weight,
                    layer.post_attention_layernorm.variance_epsilon,
                    t(wgu),
                    bgu,
                    t(m.down_proj.weight),
                    m.down_proj.bias,
                )
            )
        self._dynamic_rope = getattr(self.rotary, "rope_type", "default") in DYNAMIC_ROPE
        if not self._dynamic_rope:  # static tables for every position, built once
            self._cos, self._sin = self._tables(torch.arange(max_len, device=self.device))

    def forward(self, batch: ForwardBatch, kv: Any) -> torch.Tensor:
        """Run the step's tokens through all layers (writing their keys and values into `kv`);
        logits [m, vocab] of `batch.sample_index`."""
        positions = batch.positions
        if self._dynamic_rope:
            cos, sin = self._tables(positions)
        else:
            cos, sin = self._cos[positions], self._sin[positions]
        cos, sin = cos[:, None], sin[:, None]
        h = self._layers(batch, kv, cos, sin)
        if h.shape[0] != batch.sample_index.shape[0]:
            h = h[batch.sample_index]
        return F.linear(_rms_norm(h, self.norm, self.norm_eps), self.head)

    def _layers(self, batch: ForwardBatch, kv: Any, cos: torch.Tensor, sin: torch.Tensor):  # noqa: ANN202
        """All decoder layers over the step's tokens; hidden states [T, hidden]."""
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        qk_heads = heads + kv_heads
        half = dim // 2
        act, inter, scale = self.act, self.inter, self.scaling
        h = F.embedding(batch.input_ids, self.embed)
        count = h.shape[0]
        for i, lay in enumerate(self.layers):
            x = _rms_norm(h, lay.w_in, lay.eps_in)
            qkv = _linear(x, lay.wqkv, lay.bqkv).view(count, qk_heads + kv_heads, dim)
            qk = qkv[:, :qk_heads]
            rot = qk.roll(half, -1).mul_(sin)  # rotate_half(x) * sin, with sin's sign folded in
            qk.mul_(cos).add_(rot)
            kv.write(i, qkv[:, heads:qk_heads], qkv[:, qk_heads:], batch)
            o = attend(kv, i, qkv[:, :heads], batch, scale, self.windows[i])
            h = _linear(o.reshape(count, heads * dim), lay.wo, lay.bo, residual=h)
            x = _rms_norm(h, lay.w_post, lay.eps_post)
            gate, up = _linear(x, lay.wgu, lay.bgu).split(inter, dim=-1)
            h = _linear(act(gate).mul_(up), lay.wd, lay.bd, residual=h)
        return h

    def _tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [len, dim] from the model's own rotary module."""
        probe = self.embed[:1]
        cos, sin = self.rotary(probe, positions[None, :])
        cos, sin = cos[0], sin[0]
        half = sin.shape[-1] // 2
        return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def _linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight_t (+ bias) (+ residual) on 2-D x, in one matmul call where possible."""
    if residual is None:
        if bias is None:
            return torch.mm(x, weight_t)
        return torch.addmm(bias, x, weight_t)
    out = torch.addmm(residual, x, weight_t)
    return out if bias is None else out.add_(bias)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate linears' weights; the modules then view the fused tensor (no extra memory)."""
    weight = torch.cat([lin.weight.data for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b.data if b is not None else weight.new_zeros(lin.out_features)
                for b, lin in zip(biases, linears, strict=True)
            ]
        )
    start = 0
    for lin in linears:
        end = start + lin.out_features
        lin.weight.data = weight[start:end]
        if lin.bias is not None and bias is not None:
            lin.bias.data = bias[start:end]
        start = end
    return weight, bias
