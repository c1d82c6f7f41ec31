"""The default codec backend: a frame-rate decoder ending in an inverse STFT (Vocos-style), over a 128-dim latent.

Encoder: a fixed 128-band log-mel (`config.encoder == "mel"`), or a learned causal ConvNeXt encoder over the
log-magnitude STFT (`"learned"`). Decoder: causal conv -> ConvNeXt blocks at 75 frames/s -> per-frame log-magnitude
and phase for n_fft // 2 + 1 bins (`SpectrumHead`: a running sum of predicted phase advances, or Vocos' per-frame
angle) -> inverse STFT (fixed DFT bases, overlap-add).

Phase refinement (`config.refine_iters` = K > 0): K fast Griffin-Lim iterations after the head, magnitude kept,
starting from the head's phase (`PhaseRefine`). Parameter-free, but part of the decoder, so training learns the
magnitude that sounds best after it.

Lookahead: the conv stack is causal; the lag of the streamed audio is the iSTFT overlap, n_fft - hop samples
(960 = 40 ms = 3 frames at the defaults), plus, with refinement, K * (n_fft / hop - 1) frames (each iteration
lets a frame's phase depend on its n_fft / hop - 1 neighbours on either side): 3 + 3K frames in all.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..codec import Codec, CodecError
from ..config import CodecConfig
from .modules import ISTFT, STFT, CausalConv1d, ConvNeXtBlock, LogMel, mel_filterbank


class LearnedEncoder(nn.Module):
    """wav (B, S) -> (B, dim, ceil(S / hop)), causal.

    Input features per STFT bin and frame: log-magnitude, and the cosine and sine of the bin's phase advance since
    the previous frame minus the bin centre's advance (so a partial at the bin centre reads 0): the instantaneous
    frequency that the decoder's phase needs and a log-mel cannot give it. Then a pointwise conv to `width`,
    2 causal ConvNeXt blocks, LayerNorm and a projection to `dim`.
    """

    def __init__(self, c: CodecConfig):
        super().__init__()
        n_bins = c.n_fft // 2 + 1
        self.stft = STFT(c.n_fft, c.hop)
        base = 2 * math.pi * torch.arange(n_bins, dtype=torch.float64) * c.hop / c.n_fft  # (F,) radians per hop
        self.register_buffer("base_cos", torch.cos(base).float()[:, None], persistent=False)  # (F, 1)
        self.register_buffer("base_sin", torch.sin(base).float()[:, None], persistent=False)
        self.conv_in = nn.Conv1d(3 * n_bins, c.width, 1)
        self.blocks = nn.ModuleList(ConvNeXtBlock(c.width, c.kernel, c.ffn_mult, c.causal) for _ in range(2))
        self.norm = nn.LayerNorm(c.width, eps=1e-6)
        self.proj = nn.Linear(c.width, c.dim)

    def features(self, wav: Tensor) -> Tensor:
        """wav (B, S) -> (B, 3F, T): log-magnitude, cos and sin of the demodulated phase advance."""
        re, im = self.stft(wav)  # (B, F, T) each
        re0, im0 = F.pad(re, (1, 0))[..., :-1], F.pad(im, (1, 0))[..., :-1]  # the previous frame (zeros before)
        adv_re, adv_im = re * re0 + im * im0, im * re0 - re * im0  # X_t * conj(X_t-1)
        dem_re = adv_re * self.base_cos + adv_im * self.base_sin  # times exp(-i * base advance)
        dem_im = adv_im * self.base_cos - adv_re * self.base_sin
        norm = torch.sqrt(dem_re * dem_re + dem_im * dem_im + 1e-12) + 1e-6
        log_mag = torch.log(torch.clamp(torch.sqrt(re * re + im * im + 1e-12), min=1e-5))
        return torch.cat([log_mag, dem_re / norm, dem_im / norm], dim=1)

    def forward(self, wav: Tensor) -> Tensor:
        x = self.conv_in(self.features(wav))  # (B, width, T)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x.transpose(1, 2))).transpose(1, 2)  # (B, dim, T)


class MelInverse(nn.Module):
    """Log-mel frames (B, n_mels, T) -> log STFT magnitude (B, F, T): the pseudo-inverse of the mel filterbank,
    refined by `mel_prior_iters` multiplicative non-negative least-squares updates. Frame-local and fixed."""

    def __init__(self, c: CodecConfig):
        super().__init__()
        mel = mel_filterbank(c.sample_rate, c.n_fft, c.n_mels)  # (n_mels, F)
        pinv = torch.from_numpy(np.linalg.pinv(mel.double().numpy())).float()  # (F, n_mels)
        # frames as rows, constant right operands: onnxruntime prepacks constant B matrices of MatMul
        self.register_buffer("mel", mel, persistent=False)  # (n_mels, F)
        self.register_buffer("mel_t", mel.T.contiguous(), persistent=False)  # (F, n_mels)
        self.register_buffer("pinv_t", pinv.T.contiguous(), persistent=False)  # (n_mels, F)
        self.iters = c.mel_prior_iters

    def forward(self, emb: Tensor) -> Tensor:
        target = torch.exp(emb).transpose(1, 2)  # (B, T, n_mels)
        mag = torch.clamp(torch.matmul(target, self.pinv_t), min=1e-5)  # (B, T, F)
        numerator = torch.matmul(target, self.mel)  # (B, T, F)
        for _ in range(self.iters):
            mag = mag * numerator / (torch.matmul(torch.matmul(mag, self.mel_t), self.mel) + 1e-10)
        return torch.log(torch.clamp(mag, min=1e-5)).transpose(1, 2)  # (B, F, T)


class SpectrumHead(nn.Module):
    """Hidden frames h (B, width, T) -> STFT (real, imag), each (B, n_fft // 2 + 1, T).

    Magnitude = exp(predicted log-magnitude, softly bounded above by log(n_fft)). Phase, by `config.phase`:
    - "angle": a predicted angle per frame and bin (Vocos). A time-invariant network gives a steady note the same
      angles in every frame, so its output repeats every hop: only multiples of 75 Hz come out right.
    - "advance": a phase vocoder. Each bin's phase is the running sum over frames of its advance per hop: the bin
      centre's (2 pi k hop / n_fft), plus the deviation that the slope of the log-magnitude across bins implies
      (a partial's lobe is ~Gaussian, so d log|X| / dk is proportional to the partial's offset from bin k; constant
      from the Gaussian approximation of the Hann window, as in phase-gradient heap integration), plus a learned
      correction; then the window's -pi k, plus a learned offset. The learned parts start at zero, so an untrained
      decoder already has coherent phase; the network only has to learn magnitudes first.
      Streaming state: the running sums (B, F), wrapped to [0, 2 pi). The sums run in float64.
    """

    def __init__(self, c: CodecConfig):
        super().__init__()
        self.n_bins, self.mode = c.n_fft // 2 + 1, c.phase
        self.mel_prior = MelInverse(c) if c.uses_mel_prior else None
        self.norm = nn.LayerNorm(c.width, eps=1e-6)
        self.proj = nn.Linear(c.width, (2 if c.phase == "angle" else 3) * self.n_bins)
        self.max_log_mag = math.log(c.n_fft)  # a full-scale sinusoid has |X| = n_fft / 4 under a Hann window
        self.slope_gain = c.hop / (0.25645 * c.n_fft)  # Hann ~ Gaussian with lambda = 0.25645 n_fft^2
        k = torch.arange(self.n_bins, dtype=torch.float64)[:, None]  # (F, 1)
        self.register_buffer("bin_advance", torch.remainder(2 * math.pi * k * c.hop / c.n_fft, 2 * math.pi),
                             persistent=False)
        self.register_buffer("window_phase", torch.remainder(-math.pi * k, 2 * math.pi).float(), persistent=False)
        with torch.no_grad():
            if self.mel_prior is not None:  # the learned log-magnitude correction starts at zero
                self.proj.weight[: self.n_bins] = 0.0
                self.proj.bias[: self.n_bins] = 0.0
            else:
                self.proj.bias[: self.n_bins] = -6.0  # start quiet (|X| ~ 0.0025): silence is most of most notes
            if c.phase == "advance":  # learned advance correction and offset start at zero
                self.proj.weight[self.n_bins:] = 0.0
                self.proj.bias[self.n_bins:] = 0.0

    def _outputs(self, h: Tensor, emb: Tensor) -> list[Tensor]:
        out = self.proj(self.norm(h.transpose(1, 2))).transpose(1, 2)  # (B, 2F or 3F, T)
        log_mag, *rest = out.split(self.n_bins, dim=1)  # (B, F, T) each
        if self.mel_prior is not None:
            log_mag = log_mag + self.mel_prior(emb)  # the learned part is a correction of the prior
        # a soft upper bound: a hard clamp has no gradient above it, and bins stuck there stay loud for good
        return [self.max_log_mag - F.softplus(self.max_log_mag - log_mag), *rest]

    def _advance(self, log_mag: Tensor, correction: Tensor) -> Tensor:
        slope = F.pad(log_mag[:, 2:] - log_mag[:, :-2], (0, 0, 1, 1)) / 2  # (B, F, T), d log|X| / dk
        return (self.slope_gain * slope + correction).double() + self.bin_advance  # radians per hop

    @staticmethod
    def _complex(log_mag: Tensor, phase: Tensor) -> tuple[Tensor, Tensor]:
        mag = torch.exp(log_mag)
        return mag * torch.cos(phase), mag * torch.sin(phase)

    @staticmethod
    def _wrap(x: Tensor) -> Tensor:
        return x - (2 * math.pi) * torch.floor(x / (2 * math.pi))

    def forward(self, h: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        log_mag, *p = self._outputs(h, emb)
        if self.mode == "angle":
            return self._complex(log_mag, p[0])
        running = self._wrap(torch.cumsum(self._advance(log_mag, p[0]), dim=2)).float()  # (B, F, T)
        return self._complex(log_mag, running + self.window_phase + p[1])

    def step(self, h: Tensor, emb: Tensor, phase: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """h (B, width, t), its frames emb (B, dim, t), running phase (B, F) or None ("angle") -> real, imag
        (B, F, t), new running phase."""
        log_mag, *p = self._outputs(h, emb)
        if self.mode == "angle":
            return (*self._complex(log_mag, p[0]), None)
        running = self._wrap(phase.double()[:, :, None] + torch.cumsum(self._advance(log_mag, p[0]), dim=2))
        running = running.float()  # (B, F, t)
        return (*self._complex(log_mag, running + self.window_phase + p[1]), running[:, :, -1])


class PhaseRefine(nn.Module):
    """(real, imag) (B, F, T) -> the same magnitudes with a more consistent phase: `iters` fast Griffin-Lim
    iterations (Perraudin et al. 2013, momentum 0.99) starting from the given phase.

    One iteration overlap-adds the frames (`ISTFT`'s bases, constant window gain) and analyses the result again
    at the same frame positions, so a frame's new phase depends on its `n_fft / hop - 1` neighbours on either side;
    after `iters` iterations frames within `reach` = iters * (n_fft / hop - 1) of either end of the input have seen
    a truncated neighbourhood. Frames with zero magnitude contribute nothing: zero frames before the start of a note
    are the same as no frames, which is what makes the windowed streaming form exact.
    """

    MOMENTUM = 0.99

    def __init__(self, c: CodecConfig, istft: ISTFT):
        super().__init__()
        self.iters, self.hop = c.refine_iters, c.hop
        self.reach = c.refine_iters * (c.n_fft // c.hop - 1)
        self.overlap_add = istft.overlap_add
        self.register_buffer("analysis", STFT(c.n_fft, c.hop).basis, persistent=False)  # (2F, 1, n_fft)

    def forward(self, re: Tensor, im: Tensor) -> tuple[Tensor, Tensor]:
        mag = torch.sqrt(re * re + im * im + 1e-20)
        unit_re, unit_im = re / mag, im / mag
        prev_re = prev_im = None
        alpha = self.MOMENTUM / (1 + self.MOMENTUM)
        for _ in range(self.iters):
            y = self.overlap_add(mag * unit_re, mag * unit_im)  # (B, (T - 1) * hop + n_fft), frame t at t * hop
            new_re, new_im = F.conv1d(y[:, None], self.analysis, stride=self.hop).chunk(2, dim=1)  # (B, F, T)
            a_re, a_im = (new_re, new_im) if prev_re is None else (new_re - alpha * prev_re, new_im - alpha * prev_im)
            norm = torch.sqrt(a_re * a_re + a_im * a_im + 1e-12)
            unit_re, unit_im, prev_re, prev_im = a_re / norm, a_im / norm, new_re, new_im
        return mag * unit_re, mag * unit_im


class StftDecoder(nn.Module):
    """emb (B, dim, T) -> wav (B, T * hop). `step` is the same computation with explicit streaming state."""

    def __init__(self, c: CodecConfig):
        super().__init__()
        self.conv_in = CausalConv1d(c.dim, c.width, c.kernel, c.causal)
        self.norm_in = nn.LayerNorm(c.width, eps=1e-6)
        self.blocks = nn.ModuleList(ConvNeXtBlock(c.width, c.kernel, c.ffn_mult, c.causal)
                                    for _ in range(c.n_blocks))
        self.head = SpectrumHead(c)
        self.istft = ISTFT(c.n_fft, c.hop)
        self.refine = PhaseRefine(c, self.istft) if c.refine_iters > 0 else None

    def spectrum(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        """emb (B, dim, T) -> the head's (real, imag) (B, F, T), before refinement."""
        h = self.norm_in(self.conv_in(emb).transpose(1, 2)).transpose(1, 2)  # (B, width, T)
        for block in self.blocks:
            h = block(h)
        return self.head(h, emb)

    def synthesize(self, re: Tensor, im: Tensor) -> Tensor:
        """The head's (real, imag) (B, F, T) -> wav (B, T * hop): phase refinement, then the inverse STFT."""
        if self.refine is not None:
            re, im = self.refine(re, im)
        return self.istft(re, im)

    def forward(self, emb: Tensor) -> Tensor:
        return self.synthesize(*self.spectrum(emb))  # (B, T * hop)

    def step(self, frames: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """frames (B, dim, t), state [conv_in, block0.., (phase,) (refine_history,) istft_overlap] ->
        (audio (B, t * hop), new state, tail).

        Without refinement the audio lags the full decode by the iSTFT overlap and `tail` is None (the new
        istft_overlap is the rest of the note if it ends here). With refinement the head's last 2 * reach frames
        (refine_history) are refined again with the new ones; the frames `reach` or more before the newest are
        final (their neighbourhood is complete) and are overlap-added into `audio`; `tail` (B, reach * hop +
        n_fft - hop) is the rest of the note if it ends here, from the same window."""
        h, s_in = self.conv_in.step(frames, state[0])
        h = self.norm_in(h.transpose(1, 2)).transpose(1, 2)  # (B, width, t)
        new_state = [s_in]
        for block, s in zip(self.blocks, state[1:]):
            h, s = block.step(h, s)
            new_state.append(s)
        at = len(self.blocks) + 1
        if self.head.mode == "advance":
            re, im, phase = self.head.step(h, frames, state[at])
            new_state.append(phase)
            at += 1
        else:
            re, im, _ = self.head.step(h, frames, None)
        if self.refine is None:
            audio, overlap = self.istft.step(re, im, state[-1])
            return audio, new_state + [overlap], None
        n_bins, reach, t = self.head.n_bins, self.refine.reach, frames.shape[2]
        window = torch.cat([state[at], torch.cat([re, im], dim=1)], dim=2)  # (B, 2F, 2 * reach + t)
        fine_re, fine_im = self.refine(window[:, :n_bins], window[:, n_bins:])
        audio, overlap = self.istft.step(fine_re[:, :, reach:reach + t], fine_im[:, :, reach:reach + t], state[-1])
        rest = self.istft.overlap_add(fine_re[:, :, reach + t:], fine_im[:, :, reach + t:])  # (B, reach*hop+lat)
        tail = torch.cat([rest[:, :overlap.shape[1]] + overlap, rest[:, overlap.shape[1]:]], dim=1)
        return audio, new_state + [window[:, :, -2 * reach:], overlap], tail


class DecoderFull(nn.Module):
    """Export wrapper: emb (B, dim, T) -> wav (B, T * hop)."""

    def __init__(self, decoder: StftDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, emb: Tensor) -> Tensor:
        return self.decoder(emb)


class DecoderStream(nn.Module):
    """Export wrapper: (frames (B, dim, t), *state) -> (audio (B, t * hop), *new_state)."""

    def __init__(self, decoder: StftDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, frames: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """-> (audio, *new_state), then the tail when the decoder refines its phase."""
        audio, new_state, tail = self.decoder.step(frames, list(state))
        return (audio, *new_state) if tail is None else (audio, *new_state, tail)


class StftCodec(Codec):
    """The default backend; see the module docstring."""

    def __init__(self, config: CodecConfig):
        super().__init__(config)
        c = config
        if c.kernel < 2:
            raise CodecError(f"stft backend: kernel must be at least 2 frames, got {c.kernel}")
        self.encoder = LogMel(c.sample_rate, c.n_fft, c.hop, c.n_mels) if c.encoder == "mel" else LearnedEncoder(c)
        self.decoder = StftDecoder(c)
        reach = self.decoder.refine.reach if self.decoder.refine is not None else 0
        self.stream_latency = c.n_fft - c.hop + reach * c.hop
        if reach:  # the not yet final frames, refined as if the note ended with the last chunk
            self.stream_tail_output = "tail"
        else:  # the overlap-add not yet complete: the full decode's last samples
            self.stream_tail_state = "istft_overlap"

    def _encode(self, wav: Tensor) -> Tensor:
        return self.encoder(wav)

    def _decode(self, emb: Tensor) -> Tensor:
        return self.decoder(emb)

    def export_modules(self) -> dict[str, nn.Module]:
        return {"codec_encoder": self.encoder, "codec_decoder": DecoderFull(self.decoder),
                "codec_decoder_stream": DecoderStream(self.decoder)}

    def stream_state_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        if not self.config.causal:
            raise CodecError("streaming decode needs a causal decoder (CodecConfig.causal=True); this one is centred")
        spec = [("conv_in", self.decoder.conv_in.state_shape)]
        spec += [(f"block{i}", b.dwconv.state_shape) for i, b in enumerate(self.decoder.blocks)]
        if self.config.phase == "advance":
            spec.append(("phase", (1, self.decoder.head.n_bins)))
        if self.decoder.refine is not None:
            spec.append(("refine_history", (1, 2 * self.decoder.head.n_bins, 2 * self.decoder.refine.reach)))
        return spec + [("istft_overlap", (1, self.decoder.istft.latency))]

    def decode_stream(self, frames: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        if len(state) != len(self.stream_state_spec()):
            raise CodecError(f"stream state has {len(state)} tensors, expected {len(self.stream_state_spec())}")
        audio, new_state, _ = self.decoder.step(frames, state)
        return audio, new_state
