"""Config dataclasses and their presets, in one place.

Every checkpoint stores its config with `dataclasses.asdict` and a format version, and models are rebuilt from
that stored config only (whisper's `ModelDimensions` habit). Presets: `tiny` (tests, seconds), `small`
(2 CPU cores, the shipped model), `paper` (the sizes of Limberg et al. 2025). Data presets: `tiny`, `default`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

MODEL_PRESETS = ("tiny", "small", "paper")
DATA_PRESETS = ("tiny", "default")
SPLITS = ("train", "valid", "test")

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], d: dict) -> T:
    """Rebuild a config dataclass from `to_dict` output; unknown keys are an error, lists become tuples."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)


def preset(table: dict[str, T], name: str, what: str) -> T:
    """Look up a preset by name with a clear error."""
    if name not in table:
        raise ValueError(f"unknown {what} preset {name!r}; choose one of {', '.join(table)}")
    return table[name]


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataConfig:
    """How the NSynth-format dataset is rendered from General-MIDI soundfonts.

    Audio follows NSynth: `sample_rate` Hz mono 16-bit, `duration_s` long, key held `hold_s` then released.
    """
    soundfonts: tuple[str, ...] = ("fluidr3", "musescore", "fluidr3mono", "timgm6mb", "sf_gmbank", "opl3")
    families: tuple[str, ...] | None = None  # None: all 11 NSynth families
    programs: tuple[int, ...] | None = None  # None: every usable GM program of the chosen families
    pitch_min: int = 48  # MIDI, inclusive
    pitch_max: int = 72  # MIDI, inclusive
    velocity: int = 100
    sample_rate: int = 16000
    duration_s: float = 4.0
    hold_s: float = 3.0
    instruments_per_split: tuple[int, int, int] = (10, 3, 3)  # at most this many per family in train/valid/test
    pitch_check_notes: int = 3  # notes per instrument judged by the pitch tracker (0 disables the check)
    pitch_tolerance_cents: float = 50.0
    peak_dbfs: float = -1.0  # every note is peak-normalised to this level
    silence_dbfs: float = -50.0  # notes whose peak stays below this are dropped as silent
    seed: int = 0
    workers: int = 2

    def __post_init__(self) -> None:
        for name in ("pitch_min", "pitch_max", "velocity"):
            v = getattr(self, name)
            if not 0 <= v <= 127:
                raise ValueError(f"{name}={v} is outside the MIDI range 0-127")
        if self.pitch_min > self.pitch_max:
            raise ValueError(f"pitch_min {self.pitch_min} > pitch_max {self.pitch_max}")
        if not 0 < self.hold_s <= self.duration_s:
            raise ValueError("hold_s must be in (0, duration_s]")

    @property
    def pitches(self) -> tuple[int, ...]:
        return tuple(range(self.pitch_min, self.pitch_max + 1))


DATA_PRESET_TABLE: dict[str, DataConfig] = {
    # 2 families x 3 programs of one small soundfont, 3 pitches: renders in well under a second.
    "tiny": DataConfig(soundfonts=("timgm6mb",), families=("keyboard", "string"), programs=(0, 1, 2, 40, 41, 42),
                       pitch_min=59, pitch_max=61, instruments_per_split=(1, 1, 1), pitch_check_notes=1),
    "default": DataConfig(),
}


def data_preset(name: str) -> DataConfig:
    return preset(DATA_PRESET_TABLE, name, "data")


# ------------------------------------------------------------------------------- models (below)
# ---------------------------------------------------------------------------------------------- codec
@dataclass(frozen=True)
class CodecConfig:
    """A codec behind the EnCodec-24-kHz interface: `dim`-dim continuous embeddings at sample_rate/hop frames/s.

    `backend` selects the implementation (`pgesam_train.codecs.BACKENDS`); the other fields are read by the
    backends that use them. Training fields live here too, so a checkpoint says how it was trained.
    """
    backend: str = "stft"  # stft (Vocos-style, our default) | encodec (the paper's) | griffinlim (no training)
    sample_rate: int = 24000
    hop: int = 320  # samples per frame: 24000 / 320 = 75 frames/s
    dim: int = 128
    # stft backend: encoder (fixed log-mel, or learned) -> ConvNeXt decoder at frame rate -> iSTFT head
    n_fft: int = 1280
    n_mels: int = 128
    encoder: str = "mel"  # mel | learned
    width: int = 384
    n_blocks: int = 8
    kernel: int = 7
    causal: bool = True  # causal convs: streaming needs no lookahead beyond the iSTFT overlap
    ffn_mult: int = 3  # ConvNeXt hidden width = ffn_mult * width
    # phase of each STFT bin: "angle" = predicted per frame (Vocos; steady notes come out at multiples of 75 Hz);
    # "advance" = phase vocoder: running sum of the advance implied by the log-magnitude slope + learned corrections
    phase: str = "advance"
    # used with the fixed log-mel encoder and the advance phase (`uses_mel_prior`): the log-magnitude is the mel filterbank's non-negative
    # least-squares inverse of the embedding (what Griffin-Lim starts from) plus a learned correction that starts at
    # zero, so an untrained decoder already sounds like a one-pass phase vocoder and training only refines it
    mel_prior: bool = True
    mel_prior_iters: int = 8  # multiplicative NNLS updates per frame (frame-local: streaming is unchanged)
    # fast Griffin-Lim iterations after the head (magnitude kept, phase made consistent across frames), inside the
    # decoder and so inside training; each adds n_fft / hop - 1 frames (40 ms) to the streaming lookahead
    refine_iters: int = 0
    # griffinlim backend (the floor): same log-mel encoder as `stft`, phase found by iteration
    griffinlim_iters: int = 32
    # encodec backend: SEANet encoder/decoder of the `encodec` package, no quantizer
    encodec_n_filters: int = 32
    encodec_lstm_layers: int = 2
    encodec_ratios: tuple[int, ...] = (8, 5, 4, 2)
    encodec_pretrained: bool = True  # True: Meta's encodec_24khz weights; False: random init (trained by us)
    # training
    steps: int = 20000
    batch_size: int = 8
    crop_frames: int = 75  # training crops of this many frames (1 s)
    lr: float = 2e-4
    seed: int = 0
    loss_mel: float = 1.0  # multi-scale log-mel L1
    loss_stft: float = 1.0  # multi-resolution STFT (spectral convergence + log-magnitude L1)
    loss_wav: float = 0.0  # waveform L1
    # stft backend: L1 between the head's log-magnitude (before phase refinement) and the original's STFT
    # log-magnitude at the codec's own framing (n_fft, hop): a magnitude target no phase error can blur
    loss_mag: float = 0.0

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.hop <= 0 or self.sample_rate <= 0:
            raise ValueError("codec dim, hop and sample_rate must be positive")
        if self.encoder not in ("mel", "learned"):
            raise ValueError(f"codec encoder {self.encoder!r}: choose mel or learned")
        if self.phase not in ("angle", "advance"):
            raise ValueError(f"codec phase {self.phase!r}: choose angle or advance")
        if self.encoder == "mel" and self.n_mels != self.dim:
            raise ValueError(f"a log-mel encoder gives n_mels={self.n_mels} dims, but dim={self.dim}")
        if self.n_fft < self.hop or self.n_fft % self.hop:
            raise ValueError(f"n_fft {self.n_fft} must be a multiple of hop {self.hop}")
        if self.refine_iters < 0:
            raise ValueError(f"codec refine_iters must be 0 or more, got {self.refine_iters}")
        if self.loss_mag < 0 or (self.loss_mag and self.backend != "stft"):
            raise ValueError(f"codec loss_mag {self.loss_mag}: 0 or more, and only for the stft backend (it "
                             "supervises the stft head's magnitude)")

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def uses_mel_prior(self) -> bool:
        return self.mel_prior and self.encoder == "mel" and self.phase == "advance"


CODEC_PRESET_TABLE: dict[str, CodecConfig] = {
    # tests: one narrow ConvNeXt block (stft), a 4-filter 1-LSTM-layer SEANet at random init (encodec)
    "tiny": CodecConfig(width=32, n_blocks=1, ffn_mult=2, griffinlim_iters=4, encodec_n_filters=4,
                        encodec_lstm_layers=1, encodec_pretrained=False, steps=20, batch_size=2, crop_frames=16),
    # 2 CPU cores: 4 ConvNeXt blocks of width 256 and 2 phase-refinement iterations (stft: decodes as fast as
    # 8 blocks of width 384 without refinement, docs/codec-comparison.md); the pretrained EnCodec 24 kHz sizes
    "small": CodecConfig(width=256, n_blocks=4, refine_iters=2, steps=10000),
}


# ---------------------------------------------------------------------------------------- transformer
@dataclass(frozen=True)
class TransformerConfig:
    """Stage 2 (Section 3.2): encoder over (x, y, pitch) tokens, causal decoder over codec frames.

    Shapes: frames (B, dim, frames) of the latent cache; the decoder sees (B, frames, dim) prefixed by <BOS> = 0.
    Training fields live here too, so a checkpoint says how it was trained.
    """
    d_model: int = 256
    n_heads: int = 4
    n_encoder_layers: int = 4
    n_decoder_layers: int = 4
    d_ff: int = 1024
    dropout: float = 0.1
    frames: int = 300  # decoder positions (4 s at 75 frames/s)
    dim: int = 128  # codec embedding size
    n_pitches: int = 25
    pitch_min: int = 48  # MIDI of pitch class 0
    z_noise: float = 0.01  # beta in z~ = mu + sigma * eps * beta
    # training
    input_noise: float = 0.0  # std (normalised units) of Gaussian noise on the teacher-forced decoder inputs
    # weight of the first `low_dims` embedding dims in the training MSE (1.0 = the paper's plain MSE). With the mel
    # encoders those are the lowest mel bands (the first 38 of 128 lie below 1 kHz: fundamentals, first harmonics)
    low_dims: int = 0
    low_dims_weight: float = 1.0
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    warmup_steps: int = 500
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 64
    steps: int = 20000
    val_every: int = 500
    val_batches: int = 8
    log_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not 0 <= self.pitch_min <= 127 - self.n_pitches + 1:
            raise ValueError(f"pitch range {self.pitch_min}+{self.n_pitches} leaves MIDI 0-127")
        if not 0 <= self.low_dims <= self.dim or self.low_dims_weight <= 0:
            raise ValueError(f"low_dims must be in 0..{self.dim} and low_dims_weight > 0 "
                             f"(got {self.low_dims}, {self.low_dims_weight})")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if not 0 < self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in (0, 1], got {self.min_lr_ratio}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


TRANSFORMER_PRESETS: dict[str, TransformerConfig] = {
    # seconds on one core; used by the tests
    "tiny": TransformerConfig(d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=2, d_ff=64, dropout=0.0,
                              lr=3e-3, warmup_steps=5, batch_size=8, steps=60, val_every=20, val_batches=2,
                              log_every=10),
    # the shipped model: a 300-frame note well under realtime on 2 CPU cores after export. 2,400 x 32 notes (~28
    # epochs of the default dataset's 2,693 training notes) took 98 minutes on 2 CPU cores; trained from scratch on
    # the small VAE's map it generates 0.995 of test notes within 50 cents (REPORT.md; 4,000 steps scored no better
    # on a smaller draw). Input noise 0.6: the best of 0 / 0.3 / 0.6 / 1.0 for free-running pitch (docs/report-notes.md)
    "small": TransformerConfig(batch_size=32, steps=2400, warmup_steps=200, val_every=250, input_noise=0.6),
    # Table 2 of the paper; lr, batch and AdamW betas as in the authors' code
    "paper": TransformerConfig(d_model=512, n_heads=8, n_encoder_layers=8, n_decoder_layers=12, d_ff=8192,
                               lr=1e-4, warmup_steps=1000, steps=100000, val_every=1000),
}


def transformer_preset(name: str) -> TransformerConfig:
    return preset(TRANSFORMER_PRESETS, name, "transformer")


# ------------------------------------------------------------------------------------------------ vae
@dataclass(frozen=True)
class VAELossConfig:
    """Eq. 1 of the paper: the seven loss weights beta and schedule exponents alpha of Table 1, the neighbour
    loss constants (Eq. 6-7) and one on/off switch per term for the ablations of Table 6.

    Where the authors' public code differs from the paper, the paper is our spec: the family weight is
    (1 - gamma)^alpha_fam (code: 1 - gamma^1.5), the neighbour sums exclude j == i (code: diagonal kept), and the
    betas are Table 1's (code: other final values).
    """
    beta_rec: float = 0.2
    beta_kl: float = 0.0039
    kl_reduction: str = "mean"  # "mean" over the batch (authors' code) or "sum" (Eq. 3 as printed; collapses here)
    beta_reg: float = 1.0
    beta_nei: float = 0.6
    beta_pitch: float = 0.07
    beta_inst: float = 0.12
    beta_fam: float = 2.0
    alpha_nei: float = 0.5  # weight gamma^alpha_nei
    alpha_inst: float = 0.8  # weight gamma^alpha_inst
    alpha_fam: float = 1.5  # weight (1 - gamma)^alpha_fam
    margin: float = 0.25  # M of Eq. 7, in latent units
    eps: float = 1e-6  # epsilon of Eq. 6-7
    use_rec: bool = True
    use_kl: bool = True
    use_reg: bool = True
    use_nei: bool = True
    use_pitch: bool = True
    use_inst: bool = True
    use_fam: bool = True


# Table 6: ablation name -> the switch it turns off
VAE_ABLATIONS: dict[str, str] = {"no_kl": "use_kl", "no_reg": "use_reg", "no_nei": "use_nei", "no_fam": "use_fam"}


@dataclass(frozen=True)
class VAEConfig:
    """Stage 1 (Section 3.1): conv encoder over (B, dim, frames) codec embeddings -> 2-D timbre latent + pitch
    logits; decoder from z (+) one-hot pitch back to (B, dim, frames); instrument and family classifiers on mu.

    `n_instruments` is set from the training split when training starts. Training fields live here too (as in
    CodecConfig), and `loss` nests the loss config, so a checkpoint says how it was trained.
    """
    dim: int = 128  # codec embedding size (input channels)
    frames: int = 300  # 4 s at 75 frames/s
    pitch_min: int = 48  # MIDI of pitch class 0
    n_pitches: int = 25  # MIDI 48..72
    latent_dim: int = 2
    conv_channels: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # encoder Conv1d outputs, stride 2 each
    enc_dense: tuple[int, ...] = (8192, 4096, 2048, 1024, 512)
    dec_dense: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    deconv_channels: tuple[int, ...] = (2048, 1024, 512, 256, 128)  # last one must equal dim
    inst_hidden: tuple[int, ...] = (4, 8, 16, 32, 64, 32, 64, 128, 256, 512, 1024)  # then N_inst
    fam_hidden: tuple[int, ...] = (4, 8, 16, 32)  # then N_fam
    n_instruments: int = 0  # classes of the instrument classifier: training instruments
    n_families: int = 11
    kernel: int = 5  # authors' code: kernel 5, padding 2
    dropout: float = 0.1
    negative_slope: float = 0.2  # LeakyReLU
    # training
    epochs: int = 1000  # not given in the paper
    batch_size: int = 256
    lr: float = 1e-4
    lr_final: float = 1.0  # learning rate at the end of training as a share of lr, by cosine decay; 1: constant
    weight_decay: float = 0.05
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    loss: VAELossConfig = field(default_factory=VAELossConfig)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):  # rebuilt by from_dict from a checkpoint
            object.__setattr__(self, "loss", from_dict(VAELossConfig, self.loss))
        if len(self.conv_channels) != len(self.deconv_channels):
            raise ValueError("VAEConfig: conv_channels and deconv_channels need the same number of layers")
        if self.deconv_channels[-1] != self.dim:
            raise ValueError(f"VAEConfig: the last deconv layer must output dim={self.dim} channels")
        if not 0 <= self.pitch_min <= 127 - self.n_pitches + 1:
            raise ValueError(f"pitch range {self.pitch_min}+{self.n_pitches} leaves MIDI 0-127")
        if not 0.0 < self.lr_final <= 1.0:
            raise ValueError(f"VAEConfig: lr_final is a share of lr in (0, 1], got {self.lr_final}")


VAE_PRESETS: dict[str, VAEConfig] = {
    # seconds on one core; used by the tests
    "tiny": VAEConfig(conv_channels=(8, 8, 16, 16, 16), enc_dense=(32, 32, 16), dec_dense=(16, 32, 32),
                      deconv_channels=(16, 16, 8, 8, 128), inst_hidden=(4, 8, 16), fam_hidden=(4, 8),
                      dropout=0.0, epochs=4, batch_size=32, lr=3e-3, weight_decay=0.0),
    # the shipped model: same structure, narrower layers; trains on 2 CPU cores in well under an hour
    # (channels kept low at full time resolution: the first conv and the last deconv cost the most).
    # beta_pitch 0.3, not Table 1's 0.07: the narrow shared trunk serves the pitch head and the timbre head;
    # at 0.07 the pitch head stays at chance for hundreds of steps (CE = ln 25), at 1.0 it starves the family
    # classifier (CE = ln 11 for 27 epochs). Measured on the log-mel cache, 50-100 steps of batch 128.
    # Training and neighbour loss (session 11, docs/report-notes.md "VAE structure"): no dropout (at 0.1 on the
    # narrow 2-4-8-... instrument classifier its cross-entropy stayed near chance, 3.5 of ln 108, and its
    # gradient on mu was 16x the neighbour loss's), a neighbour weight of 6 (Table 1: 0.6) and margin 0.5
    # (Eq. 7: 0.25), so that the repulsion fills the unit disc and the attraction outweighs the instrument
    # classifier; minibatch 64 with the learning rate decayed to a tenth over 300 epochs. Train V_pitch / V_inst
    # 1.0e4 / 1.3e4 after 25 minutes on one core (the preset before: 80 epochs, 44 / 95).
    "small": VAEConfig(conv_channels=(16, 16, 32, 64, 128), enc_dense=(512, 256, 256, 128, 128),
                       dec_dense=(128, 128, 256, 256, 512), deconv_channels=(128, 64, 32, 16, 128),
                       dropout=0.0, epochs=300, batch_size=64, lr=1e-3, lr_final=0.1,
                       loss=VAELossConfig(beta_pitch=0.3, beta_nei=6.0, margin=0.5)),
    # the paper's sizes (Section 3.1); lr, weight decay and AdamW betas as in the authors' code
    "paper": VAEConfig(),
}


def vae_preset(name: str) -> VAEConfig:
    return preset(VAE_PRESETS, name, "vae")
