"""Stage 2 of pGESAM (Section 3.2): the pitch/timbre-conditioned encoder-decoder Transformer. Modules only.

Encoder: three tokens, the timbre point's x and y (each through `Linear(1, d)`, as in the authors' code) and the
pitch (embedding), plus a learned 3-position embedding, through pre-norm self-attention layers.
Decoder: codec frames through `Linear(dim, d)` + learned positional embedding (`frames` positions), prefixed by a
<BOS> zero frame; causal self-attention, cross-attention to the encoder output, feed-forward; `Linear(d, dim)`.
Frames are normalised inside the model (per-channel mean, one global std: buffers set from the training split),
so every method takes and returns raw codec embeddings, and <BOS> is a raw zero frame.

Attention is written out so that its state is explicit, as one (keys, values) pair of tensors per decoder layer:
    self-attention cache  self_kv   L x (k, v), each (B, H, P, hd)  keys/values of the P frames seen so far
    cross-attention K/V   cross_kv  L x (k, v), each (B, H, 3, hd)  computed once per note from the encoder output
The step methods take one position as (B, d) rows: with a single position (B, d) is (B, H, 1, hd) by a reshape,
and per-layer tensors in the layout attention reads need no stacking, splitting or transposing in the exported
graph (with one stacked (L, 2, B, H, P, hd) cache, those nodes took more of the ONNX step's time than its
matrix products).
`decode_step` appends to a cache of growing length; `decode_step_static` writes into a preallocated cache of
`frames` slots at the position index, with no data-dependent control flow (CUDA graphs);
`decode_step_inplace` mutates that preallocated cache, the fastest path in eager torch (not exportable as is). It
runs on a `StepPlan` made once per note batch (`plan_inplace`): cross-attention folded into per-note matrices (the
note's keys into the query projection, its values into the output projection: two batched products and a softmax
instead of two projections and attention over three keys; a 256-wide 4-layer step reads 18 weight matrices, not
26), and every weight in the layout a product with one row per note reads fastest (`GemvLinear`). A batch-1 step
is bound by reading its weights from memory, so these two are what make it fast.
Decoding loops live in `pgesam_train.generate`.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint
from .config import TransformerConfig, from_dict

KIND = "transformer"  # checkpoint kind
N_COND_TOKENS = 3  # x, y, pitch
KV = tuple[torch.Tensor, torch.Tensor]  # one layer's (keys, values), each (B, H, length, hd)
# one layer's cross-attention folded for one note batch (`CrossAttention.fold`): score weights (B, d, H*S),
# score biases (B, 1, H*S), value-through-output-projection rows (B, H*S, d)
FoldedKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class GemvLinear(NamedTuple):
    """An `nn.Linear` laid out for products with one row per note (a decoding step): the weight is stored
    (in, out) when the output is the longer side and as the module's (out, in) otherwise, so the contiguous rows
    the product streams through are the long ones. Measured on this project's 2-core machine (one thread, 16
    matrices cycled through memory as in a step, one row): 256 -> 1024 61 us (in, out) vs 126 us (out, in);
    256 -> 768 29 vs 67 us; 1024 -> 256 82 us (out, in) vs 157 us (in, out)."""
    weight: torch.Tensor
    bias: torch.Tensor
    transposed: bool

    @classmethod
    def of(cls, linear: nn.Linear) -> "GemvLinear":
        w = linear.weight.detach()  # (out, in)
        if w.shape[0] > w.shape[1]:
            return cls(w.t().contiguous(), linear.bias.detach(), True)
        return cls(w, linear.bias.detach(), False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in) -> (B, out), as the module computes it."""
        if self.transposed:
            return torch.addmm(self.bias, x, self.weight)
        return F.linear(x, self.weight, self.bias)


class LayerPlan(NamedTuple):
    """One decoder layer prepared for `DecoderLayer.step_inplace`."""
    qkv: GemvLinear
    proj: GemvLinear
    ff_in: GemvLinear
    ff_out: GemvLinear
    cross: FoldedKV


class StepPlan(NamedTuple):
    """The decoder prepared for one note batch's in-place steps (`TimbreTransformer.plan_inplace`)."""
    frame_in: GemvLinear
    layers: list[LayerPlan]
    head: GemvLinear


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, d) -> (B, H, T, hd)."""
    b, t, d = x.shape
    return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, hd) -> (B, T, d)."""
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query position: q (B, H, 1, hd), k/v (B, H, P, hd), scale 1/sqrt(hd) (a python float, so
    the graph holds a constant), additive bias (B or 1, 1, 1, P) or None -> (B, H, 1, hd). Exported as MatMul
    (onnxruntime fuses the transpose and the scale into one FusedMatMul), Softmax, MatMul."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, 1, P)
    if bias is not None:
        scores = scores + bias
    return torch.matmul(scores.softmax(dim=-1), v)


class SelfAttention(nn.Module):
    """Multi-head self-attention (causal or not) whose keys/values can be cached and extended step by step."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.d_model, self.head_dim = d_model, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def _step_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One position: x (B, d) -> q, k, v (B, H, 1, hd); a reshape, no transpose."""
        q, k, v = self.qkv(x).split(self.d_model, dim=-1)  # 3 x (B, d); one Split node with constant sizes
        shape = (-1, self.n_heads, 1, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, T, d)
        return _heads(q, self.n_heads), _heads(k, self.n_heads), _heads(v, self.n_heads)  # (B, H, T, hd)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d), attending over the whole sequence (causally when asked)."""
        q, k, v = self._qkv(x)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)  # (B, H, T, hd)
        return self.proj(_merge(y))

    def step(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new position. x (B, d); past_k/v (B, H, P, hd) -> y (B, d), k/v (B, H, P+1, hd)."""
        q, k, v = self._step_qkv(x)  # (B, H, 1, hd)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, H, P+1, hd)
        y = _attend_one(q, k, v, self.head_dim ** -0.5)  # the newest position sees all cached ones
        return self.proj(y.reshape(-1, self.d_model)), k, v

    def step_static(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, write: torch.Tensor,
                    bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new position written into a fixed-size cache.

        Args:
            x: (B, d).
            cache_k, cache_v: (B, H, Tmax, hd); slots at and after the position hold anything.
            write: int64 (B, H, 1, hd), the slot of this position, repeated (`scatter` index).
            bias: (B or 1, 1, 1, Tmax), 0 at slots up to and including this position, -inf after.
        Returns: y (B, d) and the updated caches (B, H, Tmax, hd).
        """
        q, k, v = self._step_qkv(x)  # (B, H, 1, hd)
        cache_k, cache_v = cache_k.scatter(2, write, k), cache_v.scatter(2, write, v)  # (B, H, Tmax, hd)
        y = _attend_one(q, cache_k, cache_v, self.head_dim ** -0.5, bias)
        return self.proj(y.reshape(-1, self.d_model)), cache_k, cache_v

    def step_inplace(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, t: int,
                     qkv: GemvLinear, proj: GemvLinear) -> torch.Tensor:
        """Eager-only fast path: x (B, d); writes k/v into slot t of cache_k/v (B, H, Tmax, hd) -> y (B, d).
        qkv, proj: this module's projections as `GemvLinear`."""
        b = x.shape[0]
        q, k, v = qkv(x).view(b, 3, self.n_heads, 1, self.head_dim).unbind(1)  # (B, H, 1, hd) each
        cache_k[:, :, t:t + 1] = k
        cache_v[:, :, t:t + 1] = v
        y = F.scaled_dot_product_attention(q, cache_k[:, :, :t + 1], cache_v[:, :, :t + 1])  # (B, H, 1, hd)
        return proj(y.reshape(b, self.d_model))


class CrossAttention(nn.Module):
    """Attention from decoder positions to the encoder output, whose keys/values are computed once per note."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.d_model, self.head_dim = d_model, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def memory_kv(self, memory: torch.Tensor) -> KV:
        """memory (B, S, d) -> keys, values (B, H, S, hd)."""
        k, v = self.kv(memory).chunk(2, dim=-1)  # 2 x (B, S, d)
        return _heads(k, self.n_heads), _heads(v, self.n_heads)

    def forward(self, x: torch.Tensor, kv: KV) -> torch.Tensor:
        """x (B, T, d), kv: keys, values (B, H, S, hd) -> (B, T, d)."""
        q = _heads(self.q(x), self.n_heads)  # (B, H, T, hd)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=p)
        return self.proj(_merge(y))

    def step(self, x: torch.Tensor, kv: KV) -> torch.Tensor:
        """One position: x (B, d), kv: keys, values (B, H, S, hd) -> (B, d)."""
        q = self.q(x).reshape(-1, self.n_heads, 1, self.head_dim)  # (B, H, 1, hd)
        return self.proj(_attend_one(q, kv[0], kv[1], self.head_dim ** -0.5).reshape(-1, self.d_model))

    def fold(self, kv: KV) -> FoldedKV:
        """Fold one note batch's keys/values (B, H, S, hd) into the projections, for `step_folded`.

        Per head h and memory slot s: score = (Wq_h x + bq_h) . k_hs / sqrt(hd) = x . A_hs + a_hs, and the output
        Wo (sum_hs p_hs v_hs) + bo = sum_hs p_hs (Wo_h v_hs) + bo. Returns A^T (B, d, H*S), a (B, 1, H*S) and
        the rows Wo_h v_hs (B, H*S, d)."""
        k, v = kv
        b, h, s, hd = k.shape
        scale = hd ** -0.5
        wq = self.q.weight.view(h, hd, self.d_model)  # (H, hd, d)
        a_t = torch.einsum("bhsk,hkd->bdhs", k, wq).reshape(b, self.d_model, h * s) * scale
        bias = torch.einsum("bhsk,hk->bhs", k, self.q.bias.view(h, hd)).reshape(b, 1, h * s) * scale
        rows = torch.einsum("bhsk,dhk->bhsd", v, self.proj.weight.view(self.d_model, h, hd)).reshape(b, h * s, -1)
        return a_t.contiguous(), bias, rows.contiguous()

    def step_folded(self, x: torch.Tensor, folded: FoldedKV) -> torch.Tensor:
        """One position on `fold`'s matrices: x (B, d) -> (B, d); equals `step` up to float rounding."""
        a_t, bias, rows = folded
        b, hs = bias.shape[0], bias.shape[2]
        p = torch.baddbmm(bias, x.unsqueeze(1), a_t).view(b, 1, self.n_heads, hs // self.n_heads).softmax(-1)
        return torch.baddbmm(self.proj.bias, p.view(b, 1, hs), rows).view(b, self.d_model)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderLayer(nn.Module):
    """Pre-norm: x + SelfAttn(LN(x)), then x + FF(LN(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), causal=False))
        return x + self.ff(self.ln2(x))


class DecoderLayer(nn.Module):
    """Pre-norm: causal self-attention, cross-attention to the encoder, feed-forward; each with a residual."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(d, cfg.n_heads, cfg.dropout)
        self.cross = CrossAttention(d, cfg.n_heads, cfg.dropout)
        self.ff = FeedForward(d, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cross_kv: KV) -> torch.Tensor:
        """x (B, T, d), cross_kv: keys, values (B, H, S, hd) -> (B, T, d); the whole sequence at once (teacher
        forcing)."""
        x = x + self.drop(self.attn(self.ln1(x), causal=True))
        x = x + self.drop(self.cross(self.ln2(x), cross_kv))
        return x + self.ff(self.ln3(x))

    def _step_rest(self, x: torch.Tensor, cross_kv: KV) -> torch.Tensor:
        """Cross-attention and feed-forward of one position (eval mode: no dropout): x (B, d) -> (B, d)."""
        x = x + self.cross.step(self.ln2(x), cross_kv)
        return x + self.ff(self.ln3(x))

    def step(self, x: torch.Tensor, self_kv: KV, cross_kv: KV) -> tuple[torch.Tensor, KV]:
        """x (B, d), self_kv (B, H, P, hd) x 2 -> x (B, d), self_kv (B, H, P+1, hd) x 2."""
        y, k, v = self.attn.step(self.ln1(x), *self_kv)
        return self._step_rest(x + y, cross_kv), (k, v)

    def step_static(self, x: torch.Tensor, self_kv: KV, cross_kv: KV, write: torch.Tensor, bias: torch.Tensor
                    ) -> tuple[torch.Tensor, KV]:
        """x (B, d), self_kv (B, H, Tmax, hd) x 2 -> x (B, d), self_kv (B, H, Tmax, hd) x 2 (see
        `SelfAttention.step_static`)."""
        y, k, v = self.attn.step_static(self.ln1(x), *self_kv, write, bias)
        return self._step_rest(x + y, cross_kv), (k, v)

    def plan(self, cross_kv: KV) -> LayerPlan:
        """This layer prepared for `step_inplace` on one note batch's cross-attention keys/values."""
        ff_in, ff_out = self.ff.net[0], self.ff.net[2]
        return LayerPlan(GemvLinear.of(self.attn.qkv), GemvLinear.of(self.attn.proj), GemvLinear.of(ff_in),
                         GemvLinear.of(ff_out), self.cross.fold(cross_kv))

    def step_inplace(self, x: torch.Tensor, self_kv: KV, plan: LayerPlan, t: int) -> torch.Tensor:
        """x (B, d); self_kv (B, H, Tmax, hd) x 2 is written at slot t; plan from `plan` -> x (B, d)."""
        x = x + self.attn.step_inplace(self.ln1(x), *self_kv, t, plan.qkv, plan.proj)
        x = x + self.cross.step_folded(self.ln2(x), plan.cross)
        return x + plan.ff_out(plan.ff_in(self.ln3(x)).relu_())  # the module's ReLU; dropout is off in eval


class TimbreTransformer(nn.Module):
    """The Stage-2 network: (timbre point z (B, 2), MIDI pitch (B,)) conditions the generation of codec frames."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.x_in, self.y_in = nn.Linear(1, d), nn.Linear(1, d)
        self.pitch_emb = nn.Embedding(cfg.n_pitches, d)
        self.cond_pos = nn.Embedding(N_COND_TOKENS, d)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.enc_norm = nn.LayerNorm(d)
        self.frame_in = nn.Linear(cfg.dim, d)
        self.pos = nn.Embedding(cfg.frames, d)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.dec_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("emb_mean", torch.zeros(cfg.dim))  # (dim,)
        self.register_buffer("emb_std", torch.ones(1))  # (1,)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """nanoGPT's init: N(0, 0.02) weights, zero biases, residual output projections scaled by 1/sqrt(2L)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        n_res = 2 * (self.config.n_encoder_layers + self.config.n_decoder_layers)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "net.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / n_res ** 0.5)

    @torch.no_grad()
    def set_normalization(self, mean: torch.Tensor, std: float) -> None:
        """Per-channel mean (dim,) and one global std of the training embeddings; frames in and out stay raw."""
        if not std > 0:
            raise ValueError(f"embedding std must be positive, got {std}")
        self.emb_mean.copy_(mean.reshape(-1))
        self.emb_std.fill_(float(std))

    def _frames_in(self, frames: torch.Tensor, proj: GemvLinear | None = None) -> torch.Tensor:
        """Raw frames (..., dim) -> (..., d), through `frame_in` or its `GemvLinear` form `proj`."""
        return (self.frame_in if proj is None else proj)((frames - self.emb_mean) / self.emb_std)

    def _frames_out(self, x: torch.Tensor, proj: GemvLinear | None = None) -> torch.Tensor:
        """Decoder output (..., d) -> raw frames (..., dim), through `head` or its `GemvLinear` form `proj`."""
        return (self.head if proj is None else proj)(self.dec_norm(x)) * self.emb_std + self.emb_mean

    # ------------------------------------------------------------------------------------------ encoder
    def encode(self, z: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
        """z (B, 2) timbre point, pitch (B,) int64 MIDI in [pitch_min, pitch_min + n_pitches) -> memory (B, 3, d)."""
        tokens = torch.stack([self.x_in(z[:, 0:1]), self.y_in(z[:, 1:2]),
                              self.pitch_emb(pitch - self.config.pitch_min)], dim=1)  # (B, 3, d)
        x = self.drop(tokens + self.cond_pos.weight)
        for layer in self.encoder:
            x = layer(x)
        return self.enc_norm(x)

    def cross_kv(self, memory: torch.Tensor) -> list[KV]:
        """memory (B, S, d) -> cross-attention keys, values (B, H, S, hd) of every decoder layer."""
        return [layer.cross.memory_kv(memory) for layer in self.decoder]

    # ------------------------------------------------------------------------------------------ decoder
    def decode(self, frames: torch.Tensor, cross_kv: list[KV]) -> torch.Tensor:
        """Teacher forcing. frames (B, T, dim) = <BOS> then frames 0..T-2 -> predictions of frames 0..T-1 (B, T, dim)."""
        t = frames.shape[1]
        if t > self.config.frames:
            raise ValueError(f"{t} frames exceed the model's {self.config.frames} positions")
        x = self.drop(self._frames_in(frames) + self.pos.weight[:t])  # (B, T, d)
        for layer, kv in zip(self.decoder, cross_kv):
            x = layer(x, kv)
        return self._frames_out(x)

    def forward(self, z: torch.Tensor, pitch: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Full encoder-decoder pass: z (B, 2), pitch (B,), frames (B, T, dim) decoder input -> (B, T, dim)."""
        return self.decode(frames, self.cross_kv(self.encode(z, pitch)))

    def _step_input(self, frame: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """frame (B, dim), position () or (B,) -> decoder input (B, d)."""
        return self._frames_in(frame) + self.pos(position)

    def decode_step(self, frame: torch.Tensor, position: torch.Tensor, self_kv: list[KV], cross_kv: list[KV]
                    ) -> tuple[torch.Tensor, list[KV]]:
        """One step with a growing cache.

        Args:
            frame: (B, dim) decoder input at `position` (zeros = <BOS> at position 0).
            position: int64 () or (B,); equals P, the cache length.
            self_kv: per layer (keys, values), each (B, H, P, hd).
            cross_kv: per layer (keys, values), each (B, H, 3, hd), from `cross_kv`.
        Returns: the predicted next frame (B, dim) and self_kv with P+1 positions.
        """
        x = self._step_input(frame, position)  # (B, d)
        new = []
        for layer, kv, ckv in zip(self.decoder, self_kv, cross_kv):
            x, kv = layer.step(x, kv, ckv)
            new.append(kv)
        return self._frames_out(x), new

    def decode_step_static(self, frame: torch.Tensor, position: torch.Tensor, self_kv: list[KV],
                           cross_kv: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        """One step with a preallocated cache (per layer keys, values (B, H, Tmax, hd)), written at `position`
        () or (B,) (one per row).

        Same result as `decode_step`; shapes never change and nothing branches on data.
        """
        x = self._step_input(frame, position)  # (B, d)
        cache_k = self_kv[0][0]  # (B, H, Tmax, hd)
        pos = position.reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        write = pos.expand(frame.shape[0], cache_k.shape[1], 1, cache_k.shape[3])  # (B, H, 1, hd)
        slots = torch.arange(cache_k.shape[2], device=frame.device)  # (Tmax,)
        bias = torch.where(slots <= pos, 0.0, float("-inf")).to(x.dtype)  # (B or 1, 1, 1, Tmax)
        new = []
        for layer, kv, ckv in zip(self.decoder, self_kv, cross_kv):
            x, kv = layer.step_static(x, kv, ckv, write, bias)
            new.append(kv)
        return self._frames_out(x), new

    def plan_inplace(self, cross_kv: list[KV]) -> StepPlan:
        """The decoder prepared for `decode_step_inplace` on one note batch (cross_kv from `cross_kv`); made once
        per batch (about 8 ms at the small preset, one thread; a note takes 0.5 s), valid while the weights do not
        change."""
        return StepPlan(GemvLinear.of(self.frame_in), [layer.plan(kv) for layer, kv in zip(self.decoder, cross_kv)],
                        GemvLinear.of(self.head))

    def decode_step_inplace(self, frame: torch.Tensor, t: int, self_kv: list[KV], plan: StepPlan) -> torch.Tensor:
        """Eager torch's fast path (not for export): like `decode_step_static` at python int position t, but
        writes into self_kv (per layer (B, H, frames, hd) x 2) in place, attends over slots 0..t only and runs on
        `plan_inplace`'s plan -> (B, dim). Equals `decode_step` up to float rounding."""
        x = self._frames_in(frame, plan.frame_in) + self.pos.weight[t]  # (B, d)
        for layer, kv, lp in zip(self.decoder, self_kv, plan.layers):
            x = layer.step_inplace(x, kv, lp, t)
        return self._frames_out(x, plan.head)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def load_transformer(path: Path) -> tuple[TimbreTransformer, dict]:
    """Rebuild a Transformer from its checkpoint: (model in eval mode, the checkpoint's "extra")."""
    state = load_checkpoint(path, KIND)
    model = TimbreTransformer(from_dict(TransformerConfig, state["config"]))
    model.load_state_dict(state["model"])
    return model.eval(), state["extra"]
