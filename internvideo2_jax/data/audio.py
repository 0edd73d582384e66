"""Audio: decode + resample with PyAV, crop/pad, and the official 64-bin Kaldi fbank.

Matches the official data path: 16 kHz mono, a random 10 s crop (or zero padding), samples
scaled by 2**15, then `torchaudio.compliance.kaldi.fbank(num_mel_bins=64, sample_frequency=16000,
frame_length=25, frame_shift=10)` with torchaudio's defaults (dither 0, povey window,
pre-emphasis 0.97, DC removal, 512-point FFT, power spectrum, HTK mel from 20 Hz to Nyquist,
log floored at float32 eps), then `(x - 15.41663) / (2 * 6.55582)`. 10 s give 998 x 64.
The fbank is a float64 numpy transcription of that definition (no torch needed); tests compare
it with the C++ `kaldi-native-fbank`.
"""

from __future__ import annotations

import functools
import io
import os
from typing import Optional

import av
import numpy as np

SAMPLE_RATE = 16000
FBANK_MEAN, FBANK_STD = 15.41663, 6.55582
FRAME_LEN, FRAME_SHIFT, NFFT, NUM_BINS = 400, 160, 512, 64


class AudioReadError(RuntimeError):
  """Audio could not be decoded; the message names the file and the reason."""


def load_waveform(src, *, name: Optional[str] = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Decodes the first audio stream of a file path or bytes (an audio file or a video's track)
  -> float32 mono in [-1, 1] at `sample_rate`. Raises AudioReadError if there is none."""
  name = name or (f"<{len(src)} bytes>" if isinstance(src, (bytes, bytearray)) else os.fspath(src))
  try:
    container = av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src))
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise AudioReadError(f"{name}: cannot open: {e}") from e
  with container:
    if not container.streams.audio:
      raise AudioReadError(f"{name}: no audio stream")
    stream = container.streams.audio[0]
    if stream.codec_context is None:
      raise AudioReadError(f"{name}: audio stream has no codec context")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks = []
    try:
      for frame in container.decode(stream):
        frame.pts = None  # let the resampler run on sample counts, not (possibly odd) timestamps
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
      chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except av.error.FFmpegError as e:
      raise AudioReadError(f"{name}: decode error: {e}") from e
  if not chunks:
    raise AudioReadError(f"{name}: audio stream has no samples")
  return np.concatenate(chunks).astype(np.float32)


def crop_or_pad(wave: np.ndarray, seconds: float = 10.0, *, rng: Optional[np.random.Generator] = None,
                sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Random crop to `seconds` (start 0 without rng); shorter waves are returned as they are."""
  n = int(seconds * sample_rate)
  if len(wave) <= n:
    return wave
  start = int(rng.integers(0, len(wave) - n + 1)) if rng is not None else 0
  return wave[start:start + n]


@functools.lru_cache(maxsize=4)
def _mel_banks(num_bins: int, sample_rate: int, low_freq: float = 20.0) -> np.ndarray:
  """(NFFT/2 + 1, num_bins) triangular HTK-mel filters as torchaudio's get_mel_banks."""
  mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)  # noqa: E731
  nyquist = sample_rate / 2
  mel_low, mel_high = mel(low_freq), mel(nyquist)
  delta = (mel_high - mel_low) / (num_bins + 1)
  b = np.arange(num_bins)[:, None]
  left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
  fft_mel = mel((sample_rate / NFFT) * np.arange(NFFT // 2))[None, :]
  up = (fft_mel - left) / (center - left)
  down = (right - fft_mel) / (right - center)
  banks = np.maximum(0.0, np.minimum(up, down))  # (num_bins, NFFT/2)
  return np.pad(banks, ((0, 0), (0, 1))).T  # the Nyquist bin gets weight 0, as in torchaudio


@functools.lru_cache(maxsize=1)
def _povey_window() -> np.ndarray:
  n = np.arange(FRAME_LEN)
  return (0.5 - 0.5 * np.cos(2 * np.pi * n / (FRAME_LEN - 1))) ** 0.85


def kaldi_fbank(wave: np.ndarray, *, num_bins: int = NUM_BINS, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """torchaudio.compliance.kaldi.fbank with the official arguments on an already 2**15-scaled
  waveform -> float32 (num_frames, num_bins); num_frames = 1 + (len - 400) // 160."""
  x = np.asarray(wave, np.float64).reshape(-1)
  if len(x) < FRAME_LEN:
    return np.zeros((0, num_bins), np.float32)
  n = 1 + (len(x) - FRAME_LEN) // FRAME_SHIFT
  frames = np.lib.stride_tricks.as_strided(
      x, (n, FRAME_LEN), (x.strides[0] * FRAME_SHIFT, x.strides[0])).copy()
  frames -= frames.mean(axis=1, keepdims=True)                       # remove DC offset
  frames[:, 1:] -= 0.97 * frames[:, :-1].copy()                        # pre-emphasis ...
  frames[:, 0] *= 1 - 0.97                                             # ... first sample replicated
  frames *= _povey_window()
  power = np.abs(np.fft.rfft(frames, n=NFFT, axis=1)) ** 2             # (n, 257)
  mel = power @ _mel_banks(num_bins, sample_rate)
  return np.log(np.maximum(mel, np.finfo(np.float32).eps)).astype(np.float32)


def fbank_frames(seconds: float, sample_rate: int = SAMPLE_RATE) -> int:
  """Kaldi frames of `seconds` of audio (10 s -> 998, the official BEATs input)."""
  if int(seconds * sample_rate) < FRAME_LEN + 15 * FRAME_SHIFT:  # BEATs patches are 16 frames
    raise ValueError(f"audio_seconds={seconds} is too short: at least "
                     f"{(FRAME_LEN + 15 * FRAME_SHIFT) / sample_rate:.3f} s (one 16-frame BEATs patch)")
  return 1 + (int(seconds * sample_rate) - FRAME_LEN) // FRAME_SHIFT


def fbank_features(wave: Optional[np.ndarray], *, target_frames: int = 998) -> tuple[np.ndarray, bool]:
  """Official audio features: (target_frames, 64) normalised fbank and whether audio was present.

  Short clips are padded with zeros after the fbank (as the official PyAV path does), long ones
  cut; no audio gives zeros and False.
  """
  if wave is None or len(wave) < FRAME_LEN:
    return np.zeros((target_frames, NUM_BINS), np.float32), False
  fb = kaldi_fbank(wave * 32768.0)
  fb = (fb - FBANK_MEAN) / (2 * FBANK_STD)
  if len(fb) < target_frames:
    fb = np.pad(fb, ((0, target_frames - len(fb)), (0, 0)))
  return fb[:target_frames].astype(np.float32), True
