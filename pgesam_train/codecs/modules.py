"""Layers the codec backends share: causal conv and ConvNeXt block with explicit streaming state, and an STFT,
log-mel and inverse STFT written with fixed DFT bases (conv1d / conv_transpose1d), so they export to ONNX opset 17
with dynamic length.

Framing (all backends that use these): frame t analyses the n_fft samples that end where block t ends, i.e.
samples [(t + 1) * hop - n_fft, (t + 1) * hop) (zeros before the start), so a signal of S samples gives exactly
ceil(S / hop) frames and frame t has seen no sample after block t. The inverse STFT puts frame t's synthesis
window on the same samples.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) / (math.log(6.4) / 27.0), lin)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((math.log(6.4) / 27.0) * (m - 15.0)), m * (200.0 / 3))


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> Tensor:
    """Slaney-normalised triangular mel filters, (n_mels, n_fft // 2 + 1), as librosa.filters.mel builds them."""
    fmax = sample_rate / 2 if fmax is None else fmax
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower = (bins[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    upper = (edges[2:, None] - bins[None, :]) / np.diff(edges)[1:, None]
    fb = np.maximum(0.0, np.minimum(lower, upper)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(fb.astype(np.float32))


class STFT(nn.Module):
    """wav (B, S) -> (real, imag), each (B, n_fft // 2 + 1, ceil(S / hop)); periodic Hann window, causal framing."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        n, k = torch.arange(n_fft, dtype=torch.float64), torch.arange(n_fft // 2 + 1, dtype=torch.float64)
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        angle = 2 * math.pi * k[:, None] * n[None, :] / n_fft  # (F, n_fft)
        basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # (2F, n_fft)
        self.register_buffer("basis", basis.float()[:, None, :], persistent=False)  # (2F, 1, n_fft)

    def forward(self, wav: Tensor) -> Tensor:
        # left: n_fft - hop zeros so frame 0 ends at sample hop; right: hop - 1 zeros so T = ceil(S / hop)
        x = F.pad(wav[:, None, :], (self.n_fft - self.hop, self.hop - 1))  # (B, 1, S')
        spec = F.conv1d(x, self.basis, stride=self.hop)  # (B, 2F, T)
        return spec.chunk(2, dim=1)


class LogMel(nn.Module):
    """wav (B, S) -> natural-log mel magnitude (B, n_mels, ceil(S / hop)), floored at log(1e-5)."""

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int):
        super().__init__()
        self.stft = STFT(n_fft, hop)
        self.register_buffer("mel", mel_filterbank(sample_rate, n_fft, n_mels), persistent=False)

    def forward(self, wav: Tensor) -> Tensor:
        re, im = self.stft(wav)
        mag = torch.sqrt(re * re + im * im + 1e-12)  # (B, F, T)
        return torch.log(torch.clamp(torch.matmul(self.mel, mag), min=1e-5))  # (B, n_mels, T)


class ISTFT(nn.Module):
    """(real, imag) (B, n_fft // 2 + 1, T) -> audio, the exact inverse of `STFT` (windowed overlap-add).

    The inverse DFT and the overlap-add are one conv_transpose1d with fixed bases. Full decode: `forward` gives
    (B, T * hop); the last n_fft - hop samples lack the frames after T. Streaming: `step` takes and returns the
    overlap buffer (B, n_fft - hop) and lags the full decode by `latency` = n_fft - hop samples.
    """

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.n_fft, self.hop, self.latency = n_fft, hop, n_fft - hop
        n, k = torch.arange(n_fft, dtype=torch.float64), torch.arange(n_fft // 2 + 1, dtype=torch.float64)
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        ola_gain = float((window ** 2).reshape(-1, hop).sum(0).mean())  # 1.5 for hop = n_fft / 4
        scale = torch.full_like(k, 2.0)
        scale[0] = 1.0
        scale[-1] = 1.0 if n_fft % 2 == 0 else 2.0
        angle = 2 * math.pi * k[:, None] * n[None, :] / n_fft  # (F, n_fft)
        basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * torch.cat([scale, scale])[:, None]
        basis = basis * window / (n_fft * ola_gain)
        self.register_buffer("basis", basis.float()[:, None, :], persistent=False)  # (2F, 1, n_fft)

    def overlap_add(self, re: Tensor, im: Tensor) -> Tensor:
        """All of it, frame t at samples [t * hop, t * hop + n_fft): (B, T * hop + n_fft - hop)."""
        spec = torch.cat([re, im], dim=1)  # (B, 2F, T)
        return F.conv_transpose1d(spec, self.basis, stride=self.hop)[:, 0]

    def forward(self, re: Tensor, im: Tensor) -> Tensor:
        return self.overlap_add(re, im)[:, self.latency:]  # (B, T * hop)

    def step(self, re: Tensor, im: Tensor, overlap: Tensor) -> tuple[Tensor, Tensor]:
        y = self.overlap_add(re, im)  # (B, t * hop + latency)
        y = torch.cat([y[:, : self.latency] + overlap, y[:, self.latency:]], dim=1)
        return y[:, : -self.latency], y[:, -self.latency:]  # (B, t * hop), (B, latency)


class CausalConv1d(nn.Conv1d):
    """Conv1d over frames that sees only the present and past when `causal` (else centred, odd kernel).

    Streaming (`step`, causal only): state (B, in_channels, kernel - 1) holds the last input frames.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, causal: bool = True, groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, groups=groups)
        if not causal and kernel % 2 == 0:
            raise ValueError(f"a centred conv needs an odd kernel, got {kernel}")
        self.causal = causal
        self.context = kernel - 1

    def forward(self, x: Tensor) -> Tensor:
        pad = (self.context, 0) if self.causal else (self.context // 2, self.context // 2)
        return super().forward(F.pad(x, pad))  # (B, C_out, T)

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        if self.context == 0:
            return super().forward(x), state
        x = torch.cat([state, x], dim=2)  # (B, C_in, context + t)
        return super().forward(x), x[:, :, -self.context:]

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (1, self.in_channels, self.context)


class ConvNeXtBlock(nn.Module):
    """Vocos' ConvNeXt block on (B, C, T): depthwise conv -> LayerNorm -> C*mult -> GELU -> C, layer scale, residual."""

    def __init__(self, width: int, kernel: int, ffn_mult: int, causal: bool, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = CausalConv1d(width, width, kernel, causal, groups=width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pw1 = nn.Linear(width, ffn_mult * width)
        self.pw2 = nn.Linear(ffn_mult * width, width)
        self.gamma = nn.Parameter(torch.full((width,), layer_scale))

    def _mlp(self, h: Tensor) -> Tensor:
        h = self.norm(h.transpose(1, 2))  # (B, T, C)
        h = self.pw2(F.gelu(self.pw1(h))) * self.gamma  # (B, T, C)
        return h.transpose(1, 2)  # (B, C, T)

    def forward(self, x: Tensor) -> Tensor:
        return x + self._mlp(self.dwconv(x))

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        h, state = self.dwconv.step(x, state)
        return x + self._mlp(h), state
