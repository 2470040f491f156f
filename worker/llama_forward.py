"""LlamaFastForward: the Llama forward pass (llama, mistral, qwen2) restated for serving.

It reads the HF model's weights in place and runs the same math with far fewer operator calls,
which is what a small model's decode step costs on CPU (and kernel launches on GPU):

- q/k/v and gate/up projections are fused into one matmul each (`_fuse`: the HF modules then
  view the fused tensors, no extra memory); residual adds ride on `addmm`;
- rotary embedding uses cos/sin tables built once from the model's own rotary module, and is
  applied to queries and keys together, in place, in 4 calls per layer;
- keys and values are written to the KVStore with one copy per layer and step;
- decode attention on CPU is `baddbmm` + softmax + `bmm` with query heads grouped per KV head
  (GQA without repeating K/V), a quarter faster than SDPA's CPU kernel at batch 16;
- a whole admitted group of prompts is prefilled in one padded, causal forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from chatstream_cluster.worker.hf_model import max_context
from chatstream_cluster.worker.kv_cache import KVStore

DYNAMIC_ROPE = ("dynamic", "longrope")  # their frequencies depend on the sequence length


def supports_fast_forward(model: Any) -> bool:
    """Llama-shaped decoder (llama, mistral, qwen2) with full attention."""
    config = model.config
    if config.model_type not in ("llama", "mistral", "qwen2"):
        return False
    window = getattr(config, "sliding_window", None)
    in_use = window and getattr(config, "use_sliding_window", True)
    if in_use and window < max_context(config, None):
        return False
    base = getattr(model, "model", None)
    layer = base.layers[0] if base is not None and len(base.layers) else None
    needed = ("q_proj", "k_proj", "v_proj", "o_proj")
    return (
        layer is not None
        and all(hasattr(layer.self_attn, name) for name in needed)
        and all(hasattr(layer.mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
        and not hasattr(layer.self_attn, "q_norm")
    )


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
    """`prefill(prompts, row)` and `decode(tokens, lengths)` over a Llama-shaped HF model."""

    def __init__(self, model: Any, store: KVStore):
        base = model.model
        attn = base.layers[0].self_attn
        config = model.config
        self.store = store
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
        self.inter = base.layers[0].mlp.gate_proj.out_features
        self.act = base.layers[0].mlp.act_fn
        if getattr(config, "hidden_act", None) in ("silu", "swish"):
            self.act = F.silu  # the same function without a Module call
        self.bmm_attention = self.device.type == "cpu"
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
        self._cos = self._sin = torch.empty(0)
        self._zeros = torch.zeros(1, 1, 0)

    # -- the two entry points ---------------------------------------------------------------

    def prefill(self, prompts: list[list[int]], row: int) -> torch.Tensor:
        """Run prompts into KV rows row, row+1...; return each one's next-token logits [m, V]."""
        m, length = len(prompts), max(len(p) for p in prompts)
        self.store.ensure(length + 1)
        self.store.begin_prefill(row, m, length)
        padded = [p + [0] * (length - len(p)) for p in prompts]
        ids = torch.tensor(padded, device=self.device)
        cos, sin = self._rope_prefill(length)
        h = self._layers(ids, cos, sin, None)
        h = h.view(m, length, self.hidden)
        if all(len(p) == length for p in prompts):
            last = h[:, -1]
        else:
            ends = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
            last = h[torch.arange(m, device=self.device), ends]
        return self._logits(last)

    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """Feed tokens[i] at position lengths[i] of row i (rows 0..n-1); logits [n, V]."""
        n = len(tokens)
        kv_len = max(lengths) + 1
        self.store.ensure(kv_len)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        if n == 1:
            self.store.begin_decode(kv_len, col=lengths[0])
            cos, sin = self._rope_at(lengths[0], None)
            attend = self._decode_attention(1, None)
        else:
            lens = torch.tensor(lengths, device=self.device)
            self.store.begin_decode(kv_len, lengths=lens)
            cos, sin = self._rope_at(None, lens)
            attend = self._decode_attention(n, lens)
        return self._logits(self._layers(ids, cos, sin, attend))

    # -- the layers ---------------------------------------------------------------------

    def _layers(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Any):
        """All decoder layers over ids [n, q]; `attend` is the decode attention (None for a
        prefill). Returns the hidden states [n * q, hidden]."""
        n, q = ids.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        qk_heads = heads + kv_heads
        half = dim // 2
        store, act, inter = self.store, self.act, self.inter
        h = F.embedding(ids, self.embed).view(n * q, self.hidden)
        for i, lay in enumerate(self.layers):
            x = _rms_norm(h, lay.w_in, lay.eps_in)
            qkv = _linear(x, lay.wqkv, lay.bqkv).view(n, q, qk_heads + kv_heads, dim)
            qk = qkv[:, :, :qk_heads]
            rot = qk.roll(half, -1).mul_(sin)  # rotate_half(x) * sin, with sin's sign folded in
            qk.mul_(cos).add_(rot)
            kv = qkv[:, :, heads:].view(n, q, 2, kv_heads, dim)
            if attend is not None:
                store.write_decode(i, kv[:, 0])
                o = attend(qkv[:, 0, :heads], *store.read(i, n))
            else:
                store.write_prefill(i, kv)
                t = qkv.transpose(1, 2)
                o = F.scaled_dot_product_attention(
                    t[:, :heads], t[:, heads:qk_heads], t[:, qk_heads:],
                    is_causal=q > 1, scale=self.scaling, enable_gqa=kv_heads != heads,
                ).transpose(1, 2)
            h = _linear(o.reshape(n * q, heads * dim), lay.wo, lay.bo, residual=h)
            x = _rms_norm(h, lay.w_post, lay.eps_post)
            gate, up = _linear(x, lay.wgu, lay.bgu).split(inter, dim=-1)
            h = _linear(act(gate).mul_(up), lay.wd, lay.bd, residual=h)
        return h

    def _decode_attention(self, n: int, lens: torch.Tensor | None):  # noqa: ANN202
        """Attention for one new query per row against rows' cached keys/values."""
        heads, kv_heads, dim, scale = self.heads, self.kv_heads, self.head_dim, self.scaling
        kv_len = self.store.kv_len
        if not self.bmm_attention:
            mask = None
            if lens is not None:
                cols = torch.arange(kv_len, device=self.device)
                mask = (cols[None, :] <= lens[:, None])[:, None, None, :]

            def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                o = F.scaled_dot_product_attention(
                    q[:, :, None], k, v, attn_mask=mask, scale=scale,
                    enable_gqa=kv_heads != heads,
                )
                return o[:, :, 0]

            return sdpa
        group = heads // kv_heads
        if lens is None:
            bias = self._zero_bias(kv_len)
        else:
            cols = torch.arange(kv_len, device=self.device)
            bias = torch.zeros(n, kv_len, dtype=self.dtype, device=self.device)
            bias.masked_fill_(cols[None, :] > lens[:, None], float("-inf"))
            bias = bias[:, None, None, :].expand(n, kv_heads, 1, kv_len).reshape(-1, 1, kv_len)
        fp32 = self.dtype == torch.float32

        def grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q = q.reshape(n * kv_heads, group, dim)
            k = k.reshape(n * kv_heads, kv_len, dim)
            v = v.reshape(n * kv_heads, kv_len, dim)
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
            probs = scores.softmax(-1) if fp32 else scores.softmax(-1, dtype=torch.float32)
            return torch.bmm(probs.to(v.dtype), v).view(n, heads, dim)

        return grouped

    def _zero_bias(self, kv_len: int) -> torch.Tensor:
        if self._zeros.shape[-1] < kv_len:
            size = max(kv_len, self.store.cap)
            self._zeros = torch.zeros(1, 1, size, dtype=self.dtype, device=self.device)
        return self._zeros[:, :, :kv_len].expand(self.kv_heads, 1, kv_len)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(h, self.norm, self.norm_eps), self.head)

    # -- rotary tables --------------------------------------------------------------------

    def _tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [len, dim] from the model's own rotary module."""
        probe = self.embed[:1]
        cos, sin = self.rotary(probe, positions[None, :])
        cos, sin = cos[0], sin[0]
        half = sin.shape[-1] // 2
        return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def _static_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < length:
            size = max(length, self.store.cap)
            self._cos, self._sin = self._tables(torch.arange(size, device=self.device))
        return self._cos, self._sin

    def _rope_prefill(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._dynamic_rope:
            cos, sin = self._tables(torch.arange(length, device=self.device))
        else:
            cos, sin = self._static_tables(length)
        return cos[None, :length, None], sin[None, :length, None]

    def _rope_at(self, col: int | None, lens: torch.Tensor | None):  # noqa: ANN202
        """cos/sin [n, 1, 1, dim] for decode positions (`col` for one row, else `lens`)."""
        if self._dynamic_rope:
            positions = lens if lens is not None else torch.tensor([col], device=self.device)
            cos, sin = self._tables(positions)
            return cos[:, None, None], sin[:, None, None]
        cos, sin = self._static_tables(self.store.kv_len)
        if lens is None:
            return cos[col].view(1, 1, 1, -1), sin[col].view(1, 1, 1, -1)
        return cos[lens][:, None, None], sin[lens][:, None, None]


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
