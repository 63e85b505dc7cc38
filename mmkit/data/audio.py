"""Audio files and arrays as 16 kHz mono float32 waveforms (what Whisper reads)."""

from __future__ import annotations

import os
from math import gcd
from pathlib import Path

import numpy as np

TARGET_RATE = 16_000


class AudioLoadError(ValueError):
    """An audio input that cannot be read; the message names it and says what is accepted."""


def load_audio(source: str | os.PathLike | np.ndarray, *, sampling_rate: int | None = None,
               target_rate: int = TARGET_RATE) -> np.ndarray:
    """A waveform (N,) float32 in [-1, 1] at ``target_rate`` Hz, mono.

    source: a sound file (wav / flac / ogg through ``soundfile``; PCM wav through the standard library when
    soundfile is missing) or an array (N,) or (N, channels) with its ``sampling_rate``. Channels are averaged,
    integer samples scaled to [-1, 1], other rates resampled (polyphase, scipy).
    """
    if isinstance(source, np.ndarray):
        if sampling_rate is None:
            raise AudioLoadError("an audio array needs its sampling_rate=")
        audio, rate = source, int(sampling_rate)
    else:
        audio, rate = _read_file(Path(source))
    audio = np.asarray(audio)
    if np.issubdtype(audio.dtype, np.integer):
        audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max)
    audio = audio.astype(np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise AudioLoadError(f"audio must be (N,) or (N, channels), got shape {audio.shape}")
    if audio.size == 0:
        raise AudioLoadError(f"{source if not isinstance(source, np.ndarray) else 'the array'} holds no samples")
    if not np.isfinite(audio).all():
        raise AudioLoadError("audio holds NaN or inf samples")
    if rate != target_rate:
        from scipy.signal import resample_poly

        g = gcd(rate, target_rate)
        audio = resample_poly(audio, target_rate // g, rate // g).astype(np.float32)
    return audio


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    if not path.is_file():
        raise AudioLoadError(f"cannot load audio {str(path)!r}: no such file")
    try:
        import soundfile
    except ImportError:
        soundfile = None
    try:
        if soundfile is not None:
            data, rate = soundfile.read(str(path), always_2d=False)
            return data, int(rate)
        import wave

        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
        dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
        if dtype is None:
            raise AudioLoadError(f"{path}: {8 * width}-bit wav is not supported without soundfile")
        data = np.frombuffer(raw, dtype=dtype).reshape(-1, channels)
        if dtype is np.uint8:
            data = data.astype(np.int16) - 128
        return data, rate
    except AudioLoadError:
        raise
    except Exception as err:  # libsndfile / wave raise their own types for bad headers and truncation
        raise AudioLoadError(f"cannot load audio {str(path)!r}: {type(err).__name__}: {err}. Accepted: wav, flac, "
                             "ogg (and what libsndfile reads), mono or multi-channel") from None


__all__ = ["TARGET_RATE", "AudioLoadError", "load_audio"]
