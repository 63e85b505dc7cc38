"""Clips from files (mmkit.data.media): videos through PyAV, frame folders, stills, sound alone; bad media."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mmkit.data.clips import ClipConfig, clip_audio, clip_frames, sample_clip
from mmkit.data.media import MediaLoadError, load_clip, write_video

pytest.importorskip("av")


@pytest.fixture(scope="module")
def shapes_clip():
    clip = sample_clip(20_000_123, ClipConfig())  # 4 s at 2 fps, tones at the appearances
    return clip_frames(clip, 64), clip_audio(clip)


def pixels(frames):
    return np.stack([np.asarray(f, dtype=np.float32) for f in frames])


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_video_file_gives_its_frames_at_2_fps_and_its_sound(tmp_path, shapes_clip, suffix):
    frames, audio = shapes_clip
    path = write_video(tmp_path / f"clip{suffix}", frames, fps=2, audio=audio, repeat=5)  # written at 10 fps
    clip = load_clip(path)
    assert clip.fps == 2.0 and len(clip.frames) == len(frames) == 8
    assert np.abs(pixels(clip.frames) - pixels(frames)).mean() < 6  # the codec's loss only, frame for frame
    n = min(len(audio), len(clip.audio))
    assert abs(len(clip.audio) - len(audio)) <= 1024 and n > 0.9 * len(audio)
    tolerance = 1e-3 if suffix == ".mkv" else 0.2  # PCM is exact; AAC is lossy but in time (no shift)
    assert np.abs(clip.audio[:n] - audio[:n]).max() < tolerance
    assert np.corrcoef(clip.audio[:n], audio[:n])[0, 1] > 0.95
    # sampled at another rate: 1 fps keeps every other frame; start skips
    assert np.abs(pixels(load_clip(path, fps=1).frames) - pixels(frames[::2])).mean() < 6
    later = load_clip(path, start=1.0)
    assert len(later.frames) == 6 and abs(len(later.audio) - (len(audio) - 16000)) <= 1024


def test_a_video_without_sound_and_sound_without_video(tmp_path, shapes_clip):
    frames, audio = shapes_clip
    silent = load_clip(write_video(tmp_path / "silent.mp4", frames, fps=2))
    assert silent.audio is None and len(silent.frames) == 8  # the av encoder fills zeros for the sound
    import soundfile

    soundfile.write(tmp_path / "tones.wav", audio, 16000)
    sound = load_clip(tmp_path / "tones.wav")
    assert sound.frames == [] and sound.num_frames == 8 and sound.duration == pytest.approx(4.0)


def test_a_folder_of_frames_with_a_wav_and_a_still_image_with_sound(tmp_path, shapes_clip):
    import soundfile

    frames, audio = shapes_clip
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        for j in range(5):  # recorded at 10 fps
            frame.save(folder / f"{i * 5 + j:04d}.png")
    (folder / "notes.txt").write_text("ignored: not a frame")
    soundfile.write(tmp_path / "tones.wav", audio, 16000)
    clip = load_clip(folder, audio=tmp_path / "tones.wav", frames_fps=10)
    assert len(clip.frames) == 8 and np.array_equal(pixels(clip.frames), pixels(frames))
    assert np.abs(clip.audio - audio).max() < 1e-4
    assert len(load_clip(folder).frames) == 40  # without frames_fps every image is one 2 fps frame (20 s)
    frames[0].save(tmp_path / "still.png")
    still = load_clip(tmp_path / "still.png", audio=tmp_path / "tones.wav")
    assert len(still.frames) == 8 and still.frames[0] is still.frames[-1]  # repeated for every 0.5 s of sound


def test_long_clips_keep_their_first_30_seconds_with_a_warning(tmp_path):
    folder = tmp_path / "long"
    folder.mkdir()
    for i in range(70):  # 35 s at 2 fps
        Image.new("RGB", (16, 16), (i, 0, 0)).save(folder / f"{i:03d}.png")
    with pytest.warns(UserWarning, match=r"35.0 s long; keeping 30 s"):
        clip = load_clip(folder)
    assert len(clip.frames) == 60
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_clip(folder, start=10.0).frames) == 50
    # a 35 s sound beside 4 frames (2 s): the sound is cut to Whisper's 30 s too, naming its file
    import soundfile

    short = tmp_path / "short"
    short.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(short / f"{i:03d}.png")
    wav = tmp_path / "long.wav"
    soundfile.write(wav, np.zeros(35 * 16_000, dtype=np.float32), 16000)
    with pytest.warns(UserWarning, match=r"long.wav: the sound is 35.0 s long; keeping 30 s"):
        clip = load_clip(short, audio=wav)
    assert len(clip.frames) == 4 and len(clip.audio) == 30 * 16_000


def test_sound_alone_needs_a_sound_encoder():
    """A sound-only clip through an encoder without one (av:IMAGE+none) is refused in words, not a shape error."""
    from mmkit.encoders.av import AudioVisualEncoder, MediaClip

    class Frames(torch.nn.Module):
        dim, token_grid, num_tokens = 4, 1, 1

        def encode(self, frames):
            raise AssertionError("no frames to encode")

    encoder = AudioVisualEncoder(Frames(), None, spec="av:test+none")
    with pytest.raises(ValueError, match=r"av:test\+none has no sound encoder, and 1 of the clips have no frames"):
        encoder.encode([MediaClip(frames=[], audio=np.zeros(16_000, dtype=np.float32), fps=2.0, duration=1.0)])


def put(name, content):
    def make(folder):
        path = folder / name
        if content is None:
            path.mkdir()
        elif content is not ...:
            path.write_bytes(content)
        return path

    return make


BAD = [  # (what, file to make (... = none, None = a folder), message)
    ("missing", put("nope.mp4", ...), r"nope.mp4.*no such file or folder"),
    ("empty file", put("empty.mp4", b""), r"cannot read video .*empty.mp4"),
    ("text as video", put("notes.mp4", b"not a video"), r"cannot read video .*notes.mp4"),
    ("unknown kind", put("clip.xyz", b"?"), r"unknown kind of file '.xyz'"),
    ("empty folder", put("none", None), r"holds no frame images"),
    ("text as sound", put("bad.wav", b"RIFF?"), r"cannot load audio .*bad.wav"),
]


@pytest.mark.parametrize("what, make, message", BAD, ids=[b[0] for b in BAD])
def test_bad_media_is_refused_naming_the_file(tmp_path, what, make, message):
    path = make(tmp_path)
    with pytest.raises(MediaLoadError, match=message) as err:
        load_clip(path)
    assert "Accepted" in str(err.value) or "accepted" in str(err.value) or what == "text as sound"


@pytest.mark.parametrize("fps", [3, 0, -2, float("nan")])
def test_fps_must_split_whispers_50_states_per_second_evenly(tmp_path, fps):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(MediaLoadError, match="fps"):
        load_clip(tmp_path / "a.png", fps=fps)


def write_frameless_video(path):
    """A well-formed container whose video stream (16 x 16 mpeg4 at 2 fps) never got a frame."""
    import av

    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=2)
        video.width, video.height, video.pix_fmt = 16, 16, "yuv420p"
        out.start_encoding()  # header and index written, no packets
        for packet in video.encode():  # flushing an encoder that saw nothing gives nothing
            out.mux(packet)
    return path


@pytest.mark.parametrize("suffix, video_streams", [(".avi", 1), (".mp4", 0)])  # mp4 drops the empty track
def test_a_video_with_no_frames_is_refused_naming_it(tmp_path, suffix, video_streams):
    import av

    path = write_frameless_video(tmp_path / f"nothing{suffix}")
    with av.open(str(path)) as container:  # it opens: a well-formed file, not a corrupt one
        assert len(container.streams.video) == video_streams and not container.streams.audio
        assert sum(1 for stream in container.streams.video for _ in container.decode(stream)) == 0
    with pytest.raises(MediaLoadError, match=rf"nothing{suffix}' holds no decodable frames or sound") as err:
        load_clip(path)
    assert "Accepted: a video file" in str(err.value) and "a folder of frame images" in str(err.value)
