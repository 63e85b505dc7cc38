"""Audio-visual synchronisation as FAVOR does it: one token sequence per video frame, features side by side.

Video frames at ``fps`` and audio encoder states at ``audio_rate`` Hz (Whisper: 50) are aligned in time:
video frame t gets the ``audio_rate / fps`` audio states of its own time span (25 at 2 fps). Per frame the
audio states are zero-padded to the frame's visual token count (or, when there are more audio states than
visual tokens, average-pooled down to it) and concatenated feature-wise:

    frame t -> (tokens_per_frame, visual_dim + audio_dim)

A missing modality is zeros; a still image with audio is repeated for every audio frame span.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def synchronise(
    visual: Tensor | None,
    audio: Tensor | None,
    *,
    fps: float = 2.0,
    audio_rate: float = 50.0,
    visual_dim: int | None = None,
    audio_dim: int | None = None,
    tokens_per_frame: int | None = None,
    num_frames: int | None = None,
) -> Tensor:
    """Frame tokens (T, tokens_per_frame, visual_dim + audio_dim) of one clip.

    visual: (T, Nv, Dv) tokens of the sampled frames, (1, Nv, Dv) for a still image (repeated over the audio),
        or None (zeros; then give ``visual_dim`` and ``tokens_per_frame``).
    audio: (Ta, Da) audio encoder states at ``audio_rate`` Hz from the clip's start, or None (zeros; then give
        ``audio_dim``). Audio shorter than the video is zero-padded, longer is cut to the video's length.
    num_frames: the clip's frame count when there is no video (default: enough frames to cover the audio).
    """
    if visual is None and audio is None:
        raise ValueError("synchronise needs at least one of visual tokens and audio states")
    if fps <= 0 or audio_rate <= 0:
        raise ValueError(f"fps and audio_rate must be positive, got fps={fps}, audio_rate={audio_rate}")
    per_frame = audio_rate / fps
    if abs(per_frame - round(per_frame)) > 1e-6:
        raise ValueError(f"audio_rate / fps must be a whole number of audio states per frame, got "
                         f"{audio_rate} / {fps} = {per_frame:g}")
    per_frame = int(round(per_frame))
    if visual is not None and visual.dim() != 3:
        raise ValueError(f"visual tokens must be (frames, tokens, dim), got {tuple(visual.shape)}")
    if audio is not None and audio.dim() != 2:
        raise ValueError(f"audio states must be (time, dim), got {tuple(audio.shape)}")

    if visual is None:
        if visual_dim is None or tokens_per_frame is None:
            raise ValueError("without video, give visual_dim and tokens_per_frame (the shape the zeros take)")
        frames = num_frames if num_frames is not None else math.ceil(audio.shape[0] / per_frame)
        visual = audio.new_zeros(frames, tokens_per_frame, visual_dim)
    elif visual.shape[0] == 1 and audio is not None and (num_frames or 0) != 1:
        frames = num_frames if num_frames is not None else max(1, math.ceil(audio.shape[0] / per_frame))
        visual = visual.expand(frames, -1, -1)  # a still image, repeated for every frame span of the audio
    frames, tokens, _ = visual.shape

    if audio is None:
        if audio_dim is None:
            raise ValueError("without audio, give audio_dim (the width of the zeros)")
        return torch.cat([visual, visual.new_zeros(frames, tokens, audio_dim)], dim=-1)

    needed = frames * per_frame
    audio = audio[:needed]
    if audio.shape[0] < needed:
        audio = F.pad(audio, (0, 0, 0, needed - audio.shape[0]))
    audio = audio.reshape(frames, per_frame, audio.shape[-1]).to(visual.dtype)  # (T, per_frame, Da)
    if per_frame > tokens:  # more audio states than visual tokens: average-pool them down
        audio = F.adaptive_avg_pool1d(audio.transpose(1, 2), tokens).transpose(1, 2)
    elif per_frame < tokens:
        audio = F.pad(audio, (0, 0, 0, tokens - per_frame))
    return torch.cat([visual, audio], dim=-1)


__all__ = ["synchronise"]
