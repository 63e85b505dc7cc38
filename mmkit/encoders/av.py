"""Clips (video frames + audio) as frame tokens: any mmkit image encoder per frame, Whisper for the sound.

Spec: ``av:IMAGE_SPEC+AUDIO`` with AUDIO a Whisper name or folder, or ``none`` for video without sound::

    encoder = load_encoder("av:timm:tf_efficientnet_lite0+openai/whisper-tiny.en", token_grid=3)
    out = encoder.encode([MediaClip(frames=[...8 PIL images...], audio=waveform_16k, fps=2)])
    out.tokens  # (1, 8 * 9, 1280 + 384): per frame its 9 visual tokens with the frame's audio alongside
    out.mask    # (1, 72): True for the clip's real tokens (clips of a batch are padded to the longest)

The audio of frame t is its 0.5 s span of Whisper states (25 at 2 fps), pooled or zero-padded to the visual
token count (:func:`mmkit.data.av_sync.synchronise`); missing audio or frames are zeros. Clips may be at most
30 s (Whisper's window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.av_sync import synchronise
from .base import EncoderOutput, EncoderSpec, load_encoder


@dataclass
class MediaClip:
    """One clip: ``frames`` (images, sampled at ``fps``; may be empty for sound only) and ``audio`` (a 16 kHz
    mono waveform from the clip's start, or None); ``duration`` (seconds) when there are no frames."""

    frames: Sequence
    audio: np.ndarray | None = None
    fps: float = 2.0
    duration: float | None = None

    @property
    def num_frames(self) -> int:
        if self.frames:
            return len(self.frames)
        seconds = self.duration if self.duration is not None else (len(self.audio) / 16_000 if self.audio is not None
                                                                   else 0)
        return max(1, math.ceil(seconds * self.fps))


class AudioVisualEncoder(nn.Module):
    """Frozen image encoder + frozen Whisper encoder -> synchronised frame tokens; see the module docstring."""

    token_layout = "per frame: the image encoder's tokens with the frame's Whisper states alongside (feature-wise)"

    def __init__(self, image_encoder: nn.Module, audio_encoder: nn.Module | None, *, spec: str,
                 audio_dim: int | None = None) -> None:
        super().__init__()
        self.image_encoder, self.audio_encoder, self.spec = image_encoder, audio_encoder, spec
        self._audio_dim = audio_encoder.dim if audio_encoder is not None else (audio_dim or 0)
        self.load_kwargs = {"token_grid": getattr(image_encoder, "token_grid", None)}

    def train(self, mode: bool = True) -> AudioVisualEncoder:
        return super().train(False)  # frozen

    @property
    def tokens_per_frame(self) -> int:
        return self.image_encoder.num_tokens

    @property
    def dim(self) -> int:
        return self.image_encoder.dim + self._audio_dim

    @torch.no_grad()
    def encode(self, clips: Sequence[MediaClip] | MediaClip) -> EncoderOutput:
        """Clips -> EncoderOutput(tokens (B, T_max * tokens_per_frame, dim), pooled (B, dim), mask (B, ...))."""
        clips = [clips] if isinstance(clips, MediaClip) else list(clips)
        if not clips or not all(isinstance(c, MediaClip) for c in clips):
            raise ValueError("AudioVisualEncoder.encode takes MediaClip objects (frames, audio, fps)")
        tpf, dv = self.tokens_per_frame, self.image_encoder.dim
        audio_states = [None] * len(clips)
        with_audio = [i for i, c in enumerate(clips) if c.audio is not None]
        if with_audio and self.audio_encoder is not None:
            states, masks = self.audio_encoder.encode([clips[i].audio for i in with_audio])  # (b, 1500, Da)
            for j, i in enumerate(with_audio):
                audio_states[i] = states[j, : int(masks[j].sum())]
        if not self._audio_dim and any(not c.frames for c in clips):
            raise ValueError(f"{self.spec} has no sound encoder, and {sum(not c.frames for c in clips)} of the clips "
                             "have no frames (sound only): nothing to encode; give those clips frames, or use a spec "
                             "with a sound encoder (av:IMAGE+openai/whisper-tiny.en)")
        per_clip = []
        for clip, audio in zip(clips, audio_states):
            visual = self.image_encoder.encode(list(clip.frames)).tokens if clip.frames else None  # (T, tpf, Dv)
            per_clip.append(synchronise(
                visual, audio, fps=clip.fps, audio_rate=50.0, visual_dim=dv, audio_dim=self._audio_dim,
                tokens_per_frame=tpf, num_frames=clip.num_frames,
            ) if self._audio_dim else visual)
        longest = max(t.shape[0] for t in per_clip)
        tokens = torch.zeros(len(clips), longest * tpf, self.dim, dtype=per_clip[0].dtype)
        mask = torch.zeros(len(clips), longest * tpf, dtype=torch.bool)
        for b, t in enumerate(per_clip):
            tokens[b, : t.shape[0] * tpf] = t.reshape(-1, self.dim)
            mask[b, : t.shape[0] * tpf] = True
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return EncoderOutput(tokens=tokens, pooled=pooled, mask=mask)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, tokens_per_frame={self.tokens_per_frame}, dim={self.dim}"


def load(spec: EncoderSpec, *, token_grid: int | None, image_size, dtype: torch.dtype) -> AudioVisualEncoder:
    """Loader of ``av:IMAGE_SPEC+AUDIO`` (called by :func:`mmkit.encoders.load_encoder`)."""
    image_spec, plus, audio = spec.name.rpartition("+")
    if not plus or not image_spec:
        raise ValueError(f"encoder spec '{spec}': write av:IMAGE_SPEC+AUDIO, e.g. "
                         "av:timm:tf_efficientnet_lite0+openai/whisper-tiny.en (AUDIO = none for video without sound)")
    image_encoder = load_encoder(image_spec, token_grid=token_grid, image_size=image_size, dtype=dtype)
    audio_encoder = None
    if audio.strip().lower() != "none":
        from .whisper import WhisperAudioEncoder

        audio_encoder = WhisperAudioEncoder.from_pretrained(audio.strip(), dtype=dtype)
    return AudioVisualEncoder(image_encoder, audio_encoder, spec=str(spec))


__all__ = ["AudioVisualEncoder", "MediaClip", "load"]
