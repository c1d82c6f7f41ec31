"""The floor every trained codec must beat: the `stft` backend's fixed 128-band log-mel as the embedding, decoded
by inverting the mel filterbank (non-negative least squares) and finding a phase with fast Griffin-Lim.

No training, no parameters. Its decoder is an iterative search, so it has no ONNX or streaming form: use it for
evaluation (`pgesam-train codec eval` always reports it), not in the engine.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..codec import Codec, CodecError
from ..config import CodecConfig
from .modules import LogMel

NNLS_ITERS = 30
MOMENTUM = 0.99  # fast Griffin-Lim (Perraudin et al. 2013)
NO_EXPORT = ("the griffinlim codec decodes by iterative phase search and has no ONNX or streaming decoder; "
             "it is an evaluation floor: export a trained stft (or encodec) codec instead")


class GriffinLimCodec(Codec):
    """Log-mel encoder (exportable) and Griffin-Lim decoder (torch only)."""

    def __init__(self, config: CodecConfig):
        super().__init__(config)
        c = config
        if c.n_mels != c.dim:
            raise CodecError(f"griffinlim: the embedding is the log-mel, so n_mels ({c.n_mels}) must equal "
                             f"dim ({c.dim})")
        self.encoder = LogMel(c.sample_rate, c.n_fft, c.hop, c.n_mels)
        mel = self.encoder.mel  # (n_mels, F)
        pinv = torch.from_numpy(np.linalg.pinv(mel.double().numpy())).float()  # numpy: torch's first pinv is slow
        self.register_buffer("mel_pinv", pinv, persistent=False)  # (F, n_mels)
        self.register_buffer("window", torch.hann_window(c.n_fft, periodic=True), persistent=False)

    def _encode(self, wav: Tensor) -> Tensor:
        return self.encoder(wav)

    def mel_to_magnitude(self, emb: Tensor) -> Tensor:
        """log-mel (B, n_mels, T) -> STFT magnitude (B, F, T) by multiplicative non-negative least squares."""
        mel_basis = self.encoder.mel  # (n_mels, F)
        target = torch.exp(emb)  # (B, n_mels, T)
        mag = torch.clamp(torch.matmul(self.mel_pinv, target), min=1e-6)  # (B, F, T)
        numerator = torch.matmul(mel_basis.T, target)
        for _ in range(NNLS_ITERS):
            mag = mag * numerator / (torch.matmul(mel_basis.T, torch.matmul(mel_basis, mag)) + 1e-10)
        return mag

    def _analyse(self, y: Tensor) -> Tensor:
        """Padded-coordinate signal (B, (T - 1) * hop + n_fft) -> complex spectrum (B, F, T)."""
        frames = y.unfold(-1, self.config.n_fft, self.config.hop) * self.window  # (B, T, n_fft)
        return torch.fft.rfft(frames, dim=-1).transpose(1, 2)

    def _synthesise(self, spec: Tensor) -> Tensor:
        """Complex spectrum (B, F, T) -> padded-coordinate signal (B, (T - 1) * hop + n_fft), least-squares OLA."""
        n_fft, hop, T = self.config.n_fft, self.config.hop, spec.shape[-1]
        frames = torch.fft.irfft(spec.transpose(1, 2), n=n_fft, dim=-1) * self.window  # (B, T, n_fft)
        size = (1, (T - 1) * hop + n_fft)
        y = F.fold(frames.transpose(1, 2), size, (1, n_fft), stride=(1, hop))[:, 0, 0]  # (B, L)
        env = F.fold((self.window ** 2)[None, :, None].expand(1, n_fft, T), size, (1, n_fft), stride=(1, hop))
        return y / torch.clamp(env[:, 0, 0], min=1e-3)

    @torch.no_grad()
    def _decode(self, emb: Tensor) -> Tensor:
        mag = self.mel_to_magnitude(emb)  # (B, F, T)
        gen = torch.Generator().manual_seed(self.config.seed)
        phase = torch.exp(2j * torch.pi * torch.rand(mag.shape, generator=gen)).to(emb.device)
        previous = torch.zeros_like(phase)
        for _ in range(self.config.griffinlim_iters):
            rebuilt = self._analyse(self._synthesise(mag * phase))
            accelerated = rebuilt - (MOMENTUM / (1 + MOMENTUM)) * previous
            phase = accelerated / (accelerated.abs() + 1e-16)
            previous = rebuilt
        y = self._synthesise(mag * phase)
        start = self.config.n_fft - self.config.hop
        return y[:, start:start + emb.shape[-1] * self.config.hop]  # (B, T * hop)

    def export_modules(self) -> dict[str, nn.Module]:
        raise CodecError(NO_EXPORT)

    def stream_state_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        raise CodecError(NO_EXPORT)
