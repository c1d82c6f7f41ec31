"""The pitch tracker wrapper: our undithered decoder is torchcrepe's weighted argmax over the exact bin centres, and
a note's estimate does not depend on the process that measures it."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from pgesam_train.compat import import_torchcrepe
from pgesam_train.pitch import BIN0_CENTS, CENTS_PER_BIN, estimate_pitch, weighted_argmax_undithered


def test_decoder_is_torchcrepes_without_dither(monkeypatch) -> None:
    crepe = import_torchcrepe()
    assert crepe.CENTS_PER_BIN == CENTS_PER_BIN
    exact = (CENTS_PER_BIN * torch.arange(360.0) + BIN0_CENTS)[None, :, None]
    monkeypatch.setattr(crepe.decode.weighted_argmax, "weights", exact, raising=False)
    logits = torch.rand(2, 360, 7, generator=torch.Generator().manual_seed(0))
    logits[:, :30] = -float("inf")  # what torchcrepe's fmin mask does
    bins, hz = weighted_argmax_undithered(logits.clone())
    ref_bins, ref_hz = crepe.decode.weighted_argmax(logits.clone())
    assert torch.equal(bins, ref_bins)
    torch.testing.assert_close(hz, ref_hz, rtol=1e-5, atol=0)


def _tone(hz: float, sr: int = 24000) -> np.ndarray:
    t = np.arange(int(1.7 * sr)) / sr
    return (np.sin(2 * np.pi * hz * t) + 0.4 * np.sin(4 * np.pi * hz * t)).astype(np.float32)


def test_estimate_is_the_same_in_every_process() -> None:
    hz = 261.63 * 2 ** (7 / 1200)  # C4 + 7 cents: between two bin centres
    est = estimate_pitch(_tone(hz), 24000)
    assert abs(est.cents_off(60) - 7) < 5 and est.voiced > 0.9
    code = ("import numpy as np, sys; from pgesam_train.pitch import estimate_pitch; "
            f"t = np.arange(int(1.7 * 24000)) / 24000; hz = {hz!r}; "
            "x = (np.sin(2 * np.pi * hz * t) + 0.4 * np.sin(4 * np.pi * hz * t)).astype(np.float32); "
            "print(repr(estimate_pitch(x, 24000).midi))")
    other = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
                  .stdout.strip().splitlines()[-1])
    assert other == est.midi
