"""Export-ready and streaming forms of the `encodec` package's causal SEANet encoder and decoder.

The `encodec` modules compute their padding with `math.ceil` on floats, which the legacy (TorchScript-based) ONNX
exporter freezes to the traced length: other lengths then come out silently wrong. The layers here rebuild each
SEANet layer from a trained one (weight norm folded into a plain weight, so the graphs carry no training-only parts)
and do the padding in integer ops: `extra = (kernel - padding_total - length) % stride`.

Every layer has two forms:
  `full(x)`                         the whole signal at once, identical to the `encodec` module;
  `step(x, state, started)`         one chunk, with explicit state in and out (no hidden mutable state).

Streaming state: each causal conv keeps its last `(kernel - 1) * dilation` input samples, each transposed conv its
overlap tail (`kernel - stride` samples, without bias), each LSTM its (h, c). Everything is batch-first. The causal
convs pad the start of a signal by *reflection*, which reads `pad` samples ahead; a per-item flag `started`
(B, 1, 1) chooses between that reflection (first chunk) and the carried buffer (later chunks), so streaming is exact
with no added latency, provided the first chunk of a stream holds at least `min_first_frames` frames (7 for the
24 kHz decoder, the same minimum as the full decoder). Later chunks may be a single frame.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compat import import_encodec

State = list[Tensor]  # every state tensor is float32 and batch-first
StateSpec = list[tuple[str, tuple[int, ...]]]


def _encodec_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """`encodec.modules` and `encodec.modules.seanet`, imported through the torchaudio shim."""
    import_encodec()
    import encodec.modules as m  # noqa: PLC0415
    import encodec.modules.seanet as seanet  # noqa: PLC0415
    return m, seanet


def folded_weight(conv: nn.Module) -> Tensor:
    """The effective weight of a conv, with weight norm (old hook or parametrization) folded in; detached."""
    from torch.nn.utils.weight_norm import WeightNorm
    for hook in conv._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            return hook.compute_weight(conv).detach().clone()
    return conv.weight.detach().clone()


class StreamLayer(nn.Module):
    """A SEANet layer with a whole-signal form and a chunked form with explicit state."""

    def state_spec(self) -> StateSpec:
        """(name, shape without the batch axis) of each state tensor this layer carries."""
        return []

    def full(self, x: Tensor) -> Tensor:
        raise NotImplementedError(type(self).__name__)

    def step(self, x: Tensor, state: State, started: Tensor) -> tuple[Tensor, State]:
        """x (B, C, t) and this layer's state -> (output, new state). `started` (B, 1, 1): 1 after the first chunk."""
        return self.full(x), []


class Pointwise(StreamLayer):
    """An activation (or identity): no state, no padding."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def full(self, x: Tensor) -> Tensor:
        return self.fn(x)


class CausalConv1d(StreamLayer):
    """`encodec.modules.SConv1d` (causal, reflect padding) with integer padding arithmetic."""

    def __init__(self, sconv: nn.Module):
        super().__init__()
        if not sconv.causal or sconv.pad_mode != "reflect":
            raise ValueError("only causal SConv1d layers with reflect padding are supported (EnCodec 24 kHz); "
                             f"got causal={sconv.causal}, pad_mode={sconv.pad_mode!r}")
        src = sconv.conv.conv
        self.conv = nn.Conv1d(src.in_channels, src.out_channels, src.kernel_size[0], src.stride[0],
                              dilation=src.dilation[0], groups=src.groups, bias=src.bias is not None)
        self.conv.weight.data.copy_(folded_weight(src))
        if src.bias is not None:
            self.conv.bias.data.copy_(src.bias.detach())
        self.kernel, self.stride, self.dilation = src.kernel_size[0], src.stride[0], src.dilation[0]
        self.pad = (self.kernel - 1) * self.dilation - (self.stride - 1)  # left padding, samples
        # reflection of the first `pad` samples: x[pad], x[pad-1], ..., x[1]
        self.register_buffer("reflect_index", torch.arange(self.pad, 0, -1), persistent=False)

    def state_spec(self) -> StateSpec:
        return [("buf", (self.conv.in_channels, self.pad))] if self.pad else []

    def full(self, x: Tensor) -> Tensor:
        extra = (self.kernel - self.pad - x.shape[-1]) % self.stride if self.stride > 1 else 0
        if self.pad or self.stride > 1:
            x = F.pad(x, (self.pad, extra), mode="reflect")  # (B, C, L + pad + extra)
        return self.conv(x)

    def step(self, x: Tensor, state: State, started: Tensor) -> tuple[Tensor, State]:
        if self.stride != 1:
            raise ValueError("strided convs (the encoder's) have no streaming form")
        if not self.pad:
            return self.conv(x), []
        (buf,) = state  # (B, C, pad): the previous chunk's last input samples
        start = F.pad(x, (0, self.pad))[..., self.reflect_index]  # (B, C, pad), valid when t > pad
        context = torch.where(started > 0.5, buf, start)
        x = torch.cat([context, x], dim=-1)  # (B, C, pad + t)
        return self.conv(x), [x[..., -self.pad:]]


class CausalConvTranspose1d(StreamLayer):
    """`encodec.modules.SConvTranspose1d` (causal, trim_right_ratio 1): all `kernel - stride` trimmed on the right."""

    def __init__(self, sconv: nn.Module):
        super().__init__()
        if not sconv.causal or sconv.trim_right_ratio != 1.0:
            raise ValueError("only causal SConvTranspose1d with trim_right_ratio=1 streams without lookahead; "
                             f"got causal={sconv.causal}, trim_right_ratio={sconv.trim_right_ratio}")
        src = sconv.convtr.convtr
        self.stride = src.stride[0]
        self.trim = src.kernel_size[0] - self.stride  # overlap tail, samples
        self.out_channels = src.out_channels
        self.weight = nn.Parameter(folded_weight(src), requires_grad=False)  # (C_in, C_out, kernel)
        bias = src.bias.detach().clone() if src.bias is not None else torch.zeros(src.out_channels)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def state_spec(self) -> StateSpec:
        return [("tail", (self.out_channels, self.trim))] if self.trim else []

    def full(self, x: Tensor) -> Tensor:
        y = F.conv_transpose1d(x, self.weight, self.bias, self.stride)  # (B, C, (t-1)*stride + kernel)
        return y[..., :-self.trim] if self.trim else y  # (B, C, t * stride)

    def step(self, x: Tensor, state: State, started: Tensor) -> tuple[Tensor, State]:
        y = F.conv_transpose1d(x, self.weight, None, self.stride)  # (B, C, t * stride + trim), no bias
        if not self.trim:
            return y + self.bias[:, None], []
        (tail,) = state  # (B, C, trim): the previous chunk's overlap, not yet complete
        y = torch.cat([y[..., :self.trim] + tail, y[..., self.trim:]], dim=-1)
        return y[..., :-self.trim] + self.bias[:, None], [y[..., -self.trim:]]


class StreamLSTM(StreamLayer):
    """`encodec.modules.SLSTM`: an LSTM over time (with a skip), state (h, c) kept batch-first (B, layers, H)."""

    def __init__(self, slstm: nn.Module):
        super().__init__()
        src = slstm.lstm
        self.lstm = nn.LSTM(src.input_size, src.hidden_size, src.num_layers)
        self.lstm.load_state_dict(src.state_dict())
        self.skip = slstm.skip

    def state_spec(self) -> StateSpec:
        shape = (self.lstm.num_layers, self.lstm.hidden_size)
        return [("h", shape), ("c", shape)]

    def _run(self, x: Tensor, hc: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        xs = x.permute(2, 0, 1)  # (t, B, C)
        y, hc = self.lstm(xs, hc)
        if self.skip:
            y = y + xs
        return y.permute(1, 2, 0), hc  # (B, C, t)

    def full(self, x: Tensor) -> Tensor:
        return self._run(x, None)[0]

    def step(self, x: Tensor, state: State, started: Tensor) -> tuple[Tensor, State]:
        h, c = (s.transpose(0, 1).contiguous() for s in state)  # (layers, B, H)
        y, (h, c) = self._run(x, (h, c))
        return y, [h.transpose(0, 1), c.transpose(0, 1)]


class ResBlock(StreamLayer):
    """`encodec.modules.SEANetResnetBlock`: shortcut(x) + block(x)."""

    def __init__(self, block: list[StreamLayer], shortcut: StreamLayer):
        super().__init__()
        self.block = nn.ModuleList(block)
        self.shortcut = shortcut

    def _layers(self) -> list[StreamLayer]:
        return [*self.block, self.shortcut]

    def state_spec(self) -> StateSpec:
        return [(f"{i}_{n}", s) for i, layer in enumerate(self._layers()) for n, s in layer.state_spec()]

    def full(self, x: Tensor) -> Tensor:
        y = x
        for layer in self.block:
            y = layer.full(y)
        return self.shortcut.full(x) + y

    def step(self, x: Tensor, state: State, started: Tensor) -> tuple[Tensor, State]:
        n_block = sum(len(layer.state_spec()) for layer in self.block)
        y, new = run_steps(list(self.block), x, state[:n_block], started)
        skip, new_skip = run_steps([self.shortcut], x, state[n_block:], started)
        return skip + y, new + new_skip


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def run_steps(layers: list[StreamLayer], x: Tensor, state: State, started: Tensor) -> tuple[Tensor, State]:
    """Run layers in sequence on one chunk, each taking its slice of `state`; returns (y, new states in order)."""
    new: State = []
    pos = 0
    for layer in layers:
        n = len(layer.state_spec())
        x, s = layer.step(x, state[pos:pos + n], started)
        new += s
        pos += n
    return x, new


def convert(module: nn.Module) -> StreamLayer:
    """Turn one layer of an `encodec` SEANet into its export-ready form (weights copied, weight norm folded)."""
    m, seanet = _encodec_modules()
    if isinstance(module, m.SConv1d):
        return CausalConv1d(module)
    if isinstance(module, m.SConvTranspose1d):
        return CausalConvTranspose1d(module)
    if isinstance(module, m.SLSTM):
        return StreamLSTM(module)
    if isinstance(module, seanet.SEANetResnetBlock):
        return ResBlock([convert(b) for b in module.block], convert(module.shortcut))
    if isinstance(module, (nn.ELU, nn.Identity, nn.Tanh)):
        return Pointwise(module)
    raise TypeError(f"no export-ready form for {type(module).__name__} in a SEANet")


def _flatten(layers: nn.ModuleList) -> list[StreamLayer]:
    out: list[StreamLayer] = []
    for layer in layers:
        out += _flatten(layer.block) + [layer.shortcut] if isinstance(layer, ResBlock) else [layer]
    return out


class SEANetExport(nn.Module):
    """A whole SEANet encoder or decoder as a list of export-ready layers (a snapshot of the trained weights)."""

    def __init__(self, seanet: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([convert(layer) for layer in seanet.model])
        self.requires_grad_(False)
        self.eval()

    def state_spec(self) -> StateSpec:
        """Streaming state, batch axis left out; `started` first, then each layer's tensors in order."""
        spec: StateSpec = [("started", (1, 1))]
        for i, layer in enumerate(self.layers):
            spec += [(f"l{i}_{n}", s) for n, s in layer.state_spec()]
        return spec

    def min_frames(self) -> int:
        """Fewest input frames whose start padding (a reflection) fits in every conv of this decoder."""
        need, upsampling = 1, 1  # upsampling: samples per input frame at the current layer
        for layer in _flatten(self.layers):
            if isinstance(layer, CausalConvTranspose1d):
                upsampling *= layer.stride
            elif isinstance(layer, CausalConv1d):
                need = max(need, layer.pad // upsampling + 1)
        return need

    def full(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer.full(x)
        return x

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        started, rest = state[0], state[1:]
        y, new = run_steps(list(self.layers), x, rest, started)
        return y, [torch.ones_like(started), *new]


class EncoderGraph(nn.Module):
    """ONNX graph `codec_encoder`: wav (B, S) at 24 kHz -> embeddings (B, 128, ceil(S / hop))."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.net = SEANetExport(encoder)

    def forward(self, wav: Tensor) -> Tensor:
        return self.net.full(wav[:, None, :])


class DecoderGraph(nn.Module):
    """ONNX graph `codec_decoder`: embeddings (B, 128, T) -> wav (B, T * hop), T >= 7."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.net = SEANetExport(decoder)

    def forward(self, emb: Tensor) -> Tensor:
        return self.net.full(emb)[:, 0, :]


class DecoderStreamGraph(nn.Module):
    """ONNX graph `codec_decoder_stream`: (frames (B, 128, t), *state) -> (wav (B, t * hop), *new_state).

    The first chunk of each stream (state from `initial_state`, `started` = 0) needs t >= `min_first_frames`
    (7 for EnCodec 24 kHz); later chunks any t >= 1. Concatenated outputs equal the full decode, with no latency.
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.net = SEANetExport(decoder)
        self.min_first_frames = self.net.min_frames()

    def state_spec(self) -> StateSpec:
        return self.net.state_spec()

    def initial_state(self, batch: int) -> State:
        return [torch.zeros(batch, *shape) for _, shape in self.state_spec()]

    def forward(self, frames: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        if len(state) != len(self.state_spec()):
            raise ValueError(f"codec_decoder_stream takes {len(self.state_spec())} state tensors, got {len(state)}")
        if not _exporting() and frames.shape[-1] < self.min_first_frames and bool((state[0] < 0.5).any()):
            raise ValueError(f"the first chunk of an EnCodec stream needs at least {self.min_first_frames} frames "
                             f"(got {frames.shape[-1]}): the decoder's start padding reads that far ahead")
        wav, new = self.net.step(frames, list(state))
        return (wav[:, 0, :], *new)
