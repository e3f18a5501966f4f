"""Per-frame audio features, aligned to 25 fps video (CPU; used in data workers and by the sampler).

Contract (every feature class): attributes `num_layers` (L) and `dim` (D), and
    __call__(wav (samples,) float at 16 kHz, num_frames) -> (num_frames, L, D)
where row i describes video frame i, i.e. samples [640 i, 640 (i + 1)). The wav is zero-padded or
cut to num_frames * 640 samples first. The classes are plain objects, not nn.Modules, so a
LightningModule that holds one neither trains it nor moves it off the CPU nor checkpoints it.

`audio_windows` turns (T, L, D) features into the 5-frame windows the denoiser attends to (SPEC 4).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640


def fit_length(wav: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(samples,) -> (num_frames * 640,) float32: zero-padded at the end or cut."""
    wav = wav.reshape(-1).float()
    n = num_frames * SAMPLES_PER_FRAME
    return F.pad(wav, (0, n - wav.numel())) if wav.numel() < n else wav[:n]


def audio_windows(features: torch.Tensor, start: int, count: int, radius: int = 2) -> torch.Tensor:
    """features (T, L, D) -> (count, 2 radius + 1, L, D).

    Row i holds the features of frames start + i - radius .. start + i + radius; frames outside
    [0, T) are zeros. One gather with an index tensor, no per-frame loop."""
    t = features.shape[0]
    index = torch.arange(start, start + count)[:, None] + torch.arange(-radius, radius + 1)[None]  # (count, W)
    inside = (index >= 0) & (index < t)  # (count, W)
    if t == 0:
        return features.new_zeros(count, 2 * radius + 1, *features.shape[1:])
    windows = features[index.clamp(0, t - 1)]  # (count, W, L, D)
    return windows.masked_fill(~inside[:, :, None, None], 0.0)


class AudioFeatures:
    """Base class of the feature classes, so configs can name any subclass by `class_path`:
    set `num_layers` and `dim`, implement `__call__(wav, num_frames) -> (num_frames, L, D)`."""

    num_layers: int
    dim: int
    # Frames of speech either side of a frame that its features read: a stream (pipeline.SpeechStream)
    # waits for them. 1 for log-mel (its STFT window reaches 120 samples past a frame): streamed features
    # are then the whole file's.
    context_frames: int = 1

    def __call__(self, wav: torch.Tensor, num_frames: int) -> torch.Tensor:
        raise NotImplementedError


class LogMelFeatures(AudioFeatures):
    """Log-mel spectrogram, 4 columns per video frame concatenated: L = 1, D = 4 n_mels.

    Hop 160 samples (10 ms). Columns are computed without STFT centring on a signal padded by
    (n_fft - hop) / 2 on both sides, so column j is centred on the middle of hop j, samples
    [160 j, 160 (j + 1)); columns 4i .. 4i + 3 therefore lie inside frame i (their windows reach
    (n_fft - hop) / 2 samples past its edges). Values: (log(mel + 1e-5) - log_center) / log_scale,
    which maps silence to about -1 and a full-scale tone to about +1."""

    def __init__(self, n_mels: int = 32, n_fft: int = 400, f_min: float = 0.0, f_max: float | None = None,
                 log_center: float = -1.5, log_scale: float = 10.0):
        self.hop = 160
        self.columns_per_frame = SAMPLES_PER_FRAME // self.hop  # 4
        self.n_fft = n_fft
        self.log_center, self.log_scale = log_center, log_scale
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=n_fft, hop_length=self.hop, f_min=f_min, f_max=f_max,
            n_mels=n_mels, center=False)
        self.num_layers = 1
        self.dim = self.columns_per_frame * n_mels

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor, num_frames: int) -> torch.Tensor:
        wav = fit_length(wav, num_frames)  # (T * 640,)
        left = (self.n_fft - self.hop) // 2
        padded = F.pad(wav, (left, self.n_fft - self.hop - left))
        mel = self.mel(padded)  # (n_mels, 4 T): exactly T * 640 / 160 columns
        logmel = (torch.log(mel + 1e-5) - self.log_center) / self.log_scale
        # (n_mels, 4 T) -> (T, 4, n_mels) -> (T, 1, 4 n_mels): frame i = its 4 columns in time order
        per_frame = logmel.T.reshape(num_frames, self.columns_per_frame, -1)
        return per_frame.reshape(num_frames, 1, self.dim).contiguous()


def _conv_hop_and_field(conv_layers: list[tuple[int, int, int]] | None) -> tuple[int, int]:
    """(hop, receptive field) in samples of wav2vec2's conv feature extractor; torchaudio's default
    stack [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2 gives (320, 400), i.e. 50 Hz."""
    if conv_layers is None:
        conv_layers = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    hop, field = 1, 1
    for _, kernel, stride in conv_layers:
        field += (kernel - 1) * hop
        hop *= stride
    return hop, field


class Wav2Vec2Features(AudioFeatures):
    """All transformer layers of a torchaudio wav2vec2 model: L = encoder_num_layers, D = encoder_embed_dim.

    `arch` is `torchaudio.models.wav2vec2_model`'s keyword arguments; `weights` a local state-dict
    file (nothing is downloaded; None keeps the random initialisation, for tests). The 50 Hz
    hidden states are linearly interpolated to the video frames by time: frame i's centre,
    sample 640 i + 320, sits at position (640 i + 320 - field / 2) / hop on the 50 Hz grid."""

    context_frames = 25  # 1 s: its attention reads the whole clip, so streamed features approximate the file's

    def __init__(self, arch: dict, weights: str | None = None, normalize_waveform: bool = False):
        self.model = torchaudio.models.wav2vec2_model(**arch)
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"wav2vec2 weights {str(path)!r} not found: give a local torchaudio wav2vec2 state-dict file "
                    f"(nothing is downloaded)")
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        self.model.eval().requires_grad_(False)
        self.normalize_waveform = normalize_waveform
        self.hop, self.field = _conv_hop_and_field(arch.get("extractor_conv_layer_config"))
        self.num_layers = arch["encoder_num_layers"]
        self.dim = arch["encoder_embed_dim"]

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor, num_frames: int) -> torch.Tensor:
        wav = fit_length(wav, num_frames)  # (T * 640,)
        if self.normalize_waveform:  # large / XLSR checkpoints expect zero mean, unit variance
            wav = (wav - wav.mean()) / (wav.std() + 1e-7)
        layers, _ = self.model.extract_features(wav[None])  # L x (1, T50, D)
        hidden = torch.stack(layers, 2)[0]  # (1, T50, L, D) -> (T50, L, D)
        return _interpolate_rows(hidden, self._frame_positions(num_frames))

    def _frame_positions(self, num_frames: int) -> torch.Tensor:
        """(T,) fractional indices on the 50 Hz grid of the video frame centres."""
        centres = torch.arange(num_frames, dtype=torch.float64) * SAMPLES_PER_FRAME + SAMPLES_PER_FRAME / 2
        return (centres - self.field / 2) / self.hop


def _interpolate_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (N, ...) sampled at fractional row positions (T,) -> (T, ...), linear, clamped to [0, N - 1]."""
    pos = positions.clamp(0, x.shape[0] - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=x.shape[0] - 1)
    frac = (pos - lo).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.lerp(x[lo], x[hi], frac)
