"""Clips from files: a video (PyAV), a folder of frames, a still image or a sound file -> :class:`MediaClip`.

    clip = load_clip("cat.mp4")                          # frames at 2 fps + its sound track (16 kHz mono)
    clip = load_clip("frames/", audio="track.wav")        # frame images sorted by name, taken as 2 fps
    clip = load_clip("frames/", frames_fps=10)            # frames recorded at 10 fps, sampled down to 2
    clip = load_clip("photo.png", audio="speech.wav")     # a still image, repeated for every frame of the sound
    clip = load_clip("speech.wav")                        # sound only: the frames are zeros

What happens to imperfect input (documented, never a shape error further down):

- a video without a sound track, or a folder without audio: the audio features are zeros;
- audio without video: the visual features are zeros, one frame per ``1 / fps`` seconds of sound;
- audio longer than the frames is cut to the frames' span, shorter is zero-padded (:mod:`mmkit.data.av_sync`);
- clips longer than ``max_seconds`` (default 30 s, Whisper's window) keep their first ``max_seconds`` from
  ``start``, with a warning;
- zero frames, zero samples, an unreadable or corrupt file: :class:`MediaLoadError` naming the file and
  what is accepted; ``fps`` must divide Whisper's 50 states per second into whole numbers.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from .audio import TARGET_RATE, AudioLoadError, load_audio
from .images import ImageLoadError, load_image

AUDIO_RATE = 50.0  # Whisper encoder states per second
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".aiff", ".aif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class MediaLoadError(ValueError):
    """A clip input that cannot be read; the message names it and says what is accepted."""


def accepted_media() -> str:
    return (f"Accepted: a video file ({', '.join(VIDEO_SUFFIXES)}; needs PyAV: pip install av), a folder of frame "
            f"images ({', '.join(IMAGE_SUFFIXES)}, sorted by name) with an optional sound file, a still image, "
            f"or a sound file alone ({', '.join(AUDIO_SUFFIXES)})")


def check_fps(fps: float) -> None:
    """``fps`` must be positive and give a whole number of Whisper states (50 per second) per frame."""
    if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
        raise MediaLoadError(f"fps must be a positive number, got {fps!r}")
    per_frame = AUDIO_RATE / fps
    if abs(per_frame - round(per_frame)) > 1e-6:
        raise MediaLoadError(f"fps={fps:g} gives {per_frame:g} audio states per frame; 50 / fps must be a whole "
                             "number (e.g. fps = 0.5, 1, 2, 5, 10, 25 or 50)")


def load_clip(source: str | os.PathLike, *, audio: str | os.PathLike | None = None, fps: float = 2.0,
              frames_fps: float | None = None, start: float = 0.0, max_seconds: float | None = 30.0):
    """A :class:`~mmkit.encoders.av.MediaClip` (PIL frames at ``fps``, 16 kHz mono audio or None).

    source: a video file, a folder of frame images, a still image or a sound file (see the module docstring).
    audio: a sound file to use instead of the source's own track.
    frames_fps: the rate a folder's frames were recorded at (default: ``fps``, every image is one frame).
    start / max_seconds: the span of the clip to keep, in seconds.
    """
    from ..encoders.av import MediaClip

    check_fps(fps)
    if start < 0 or (max_seconds is not None and max_seconds <= 0):
        raise MediaLoadError(f"start must be >= 0 and max_seconds > 0, got start={start}, max_seconds={max_seconds}")
    path = Path(source)
    if not path.exists():
        raise MediaLoadError(f"cannot load clip {str(path)!r}: no such file or folder. {accepted_media()}")
    suffix = path.suffix.lower()
    if path.is_dir():
        frames, track = _frames_from_folder(path, fps, frames_fps or fps), None
    elif suffix in AUDIO_SUFFIXES:
        frames, track = [], _audio(path)
    elif suffix in IMAGE_SUFFIXES:
        frames, track = [_image(path)], None
    elif suffix in VIDEO_SUFFIXES:
        frames, track = _read_video(path, fps)
    else:
        raise MediaLoadError(f"cannot load clip {str(path)!r}: unknown kind of file '{suffix}'. {accepted_media()}")
    if audio is not None:
        track = _audio(Path(audio))
    still = len(frames) == 1 and path.is_file() and suffix in IMAGE_SUFFIXES

    first = int(round(start * fps))
    if not still:
        frames = frames[first:]
    if track is not None:
        track = track[int(round(start * TARGET_RATE)):]
        if track.size == 0:
            track = None
    seconds = (len(track) / TARGET_RATE if track is not None and (still or not frames)
               else len(frames) / fps)
    if not frames and track is None:
        raise MediaLoadError(f"clip {str(path)!r} holds nothing after start={start:g} s. {accepted_media()}")
    if max_seconds is not None and seconds > max_seconds + 1e-9:
        warnings.warn(f"{path.name}: the clip is {seconds:.1f} s long; keeping {max_seconds:g} s from {start:g} s "
                      f"(Whisper reads at most 30 s; pass start= / --start for another span)", stacklevel=2)
        if not still:
            frames = frames[: int(math.floor(max_seconds * fps))]
        if track is not None:
            track = track[: int(max_seconds * TARGET_RATE)]
    if max_seconds is not None and track is not None and len(track) > int(max_seconds * TARGET_RATE):
        # frames shorter than the sound (a long wav beside a short video): Whisper still reads at most 30 s
        warnings.warn(f"{Path(audio or path).name}: the sound is {len(track) / TARGET_RATE:.1f} s long; keeping "
                      f"{max_seconds:g} s from {start:g} s (Whisper reads at most 30 s)", stacklevel=2)
        track = track[: int(max_seconds * TARGET_RATE)]
    if still and track is not None:  # one picture for the whole sound: MediaClip repeats it per frame
        frames = frames * max(1, math.ceil(len(track) / TARGET_RATE * fps))
    duration = len(track) / TARGET_RATE if not frames else None
    return MediaClip(frames=frames, audio=track, fps=float(fps), duration=duration)


def _image(path: Path):
    try:
        return load_image(path)
    except ImageLoadError as err:
        raise MediaLoadError(str(err)) from None


def _audio(path: Path) -> np.ndarray:
    try:
        return load_audio(path)
    except AudioLoadError as err:
        raise MediaLoadError(str(err)) from None


def _frames_from_folder(folder: Path, fps: float, frames_fps: float) -> list:
    if not (math.isfinite(frames_fps) and frames_fps > 0):
        raise MediaLoadError(f"frames_fps must be a positive number, got {frames_fps!r}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MediaLoadError(f"cannot load clip {str(folder)!r}: the folder holds no frame images. {accepted_media()}")
    count = max(1, math.floor(len(files) * fps / frames_fps + 1e-9))  # frames of the clip at `fps`
    picks = [min(len(files) - 1, int(round(k * frames_fps / fps))) for k in range(count)]
    return [_image(files[i]) for i in picks]


def _read_video(path: Path, fps: float) -> tuple[list, np.ndarray | None]:
    """Frames sampled at ``fps`` (the frame showing at t = k / fps) and the first sound track, or None."""
    try:
        import av
    except ImportError:
        raise MediaLoadError(f"reading video {str(path)!r} needs PyAV: pip install av (or mmkit[video]); a folder "
                             "of frames works without it") from None
    try:
        with av.open(str(path)) as container:
            frames, origin = _sample_frames(container, fps) if container.streams.video else ([], 0.0)
        with av.open(str(path)) as container:
            track = _decode_audio(container, origin) if container.streams.audio else None
    except (av.FFmpegError, OSError, ValueError) as err:
        raise MediaLoadError(f"cannot read video {str(path)!r}: {type(err).__name__}: {err}. {accepted_media()}") from None
    if not frames and track is None:
        raise MediaLoadError(f"video {str(path)!r} holds no decodable frames or sound (zero-length or corrupt). "
                             f"{accepted_media()}")
    return frames, track


def _sample_frames(container, fps: float) -> tuple[list, float]:
    """Frames at ``fps`` and the first frame's time: sample time k / fps (from the first frame) gets the last
    decoded frame that starts at or before it, held until the next one."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    step = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
    picked, showing, end, origin = [], None, 0.0, None
    for frame in container.decode(stream):
        t = float(frame.time) if frame.time is not None else end
        origin = t if origin is None else origin
        while showing is not None and origin + len(picked) / fps < t - 1e-6:  # sample times before this frame
            picked.append(showing.to_image())
        showing, end = frame, t + step
    while showing is not None and origin + len(picked) / fps < end - 1e-6:  # the last frame shows to the end
        picked.append(showing.to_image())
    return [p.convert("RGB") for p in picked], origin or 0.0


def _decode_audio(container, origin: float) -> np.ndarray | None:
    """The first sound track, 16 kHz mono, aligned so sample 0 is at ``origin`` (the video's first frame time)."""
    import av

    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=TARGET_RATE)
    chunks, first_time = [], None
    for frame in container.decode(stream):
        if first_time is None and frame.time is not None:
            first_time = float(frame.time)
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
    chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))  # flush
    if not chunks:
        return None
    track = np.concatenate(chunks).astype(np.float32)
    shift = int(round(((first_time or 0.0) - origin) * TARGET_RATE))
    track = np.concatenate([np.zeros(shift, np.float32), track]) if shift > 0 else track[-shift:]
    return track if track.size else None


def write_video(path: str | os.PathLike, frames, *, fps: float = 2.0, audio: np.ndarray | None = None,
                codec: str = "mpeg4", repeat: int = 1) -> Path:
    """Write PIL ``frames`` (at ``fps``) and an optional 16 kHz mono ``audio`` track to a video file with PyAV.

    Each frame is written ``repeat`` times at ``fps * repeat`` (a smoother file of the same clip). The sound is
    AAC in .mp4 / .m4v / .mov, PCM in other containers (.mkv, .avi). Used to export ShapesWorld clips for
    ``mmkit video-qa`` and by the tests.
    """
    import av

    path = Path(path)
    if not frames:
        raise ValueError("write_video needs at least one frame")
    width, height = frames[0].size
    width, height = width - width % 2, height - height % 2  # yuv420p wants even sizes
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=int(round(fps * repeat)))
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = None
        if audio is not None:
            aac = path.suffix.lower() in (".mp4", ".m4v", ".mov")
            sound = out.add_stream("aac" if aac else "pcm_s16le", rate=TARGET_RATE)
            sound.layout = "mono"
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB").crop((0, 0, width, height)))
            for _ in range(repeat):
                out.mux(video.encode(frame))
        out.mux(video.encode())
        if sound is not None:
            samples = np.asarray(audio, np.float32)[None, :]
            fmt = "fltp" if sound.codec_context.name == "aac" else "s16"
            if fmt == "s16":
                samples = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
            chunk = 1024
            for i in range(0, samples.shape[1], chunk):
                piece = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, i:i + chunk]), format=fmt,
                                                   layout="mono")
                piece.sample_rate, piece.pts = TARGET_RATE, i
                out.mux(sound.encode(piece))
            out.mux(sound.encode())
    return path


__all__ = ["AUDIO_SUFFIXES", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "MediaLoadError", "accepted_media", "check_fps",
           "load_clip", "write_video"]
