"""ShapesWorld clips (appear / move / disappear, tones) and audio-visual synchronisation."""

import numpy as np
import pytest
import torch

from mmkit.data.av_sync import synchronise
from mmkit.data.clips import (
    KINDS,
    ClipConfig,
    ShapesWorldClips,
    clip_audio,
    clip_caption,
    clip_frames,
    clip_questions,
    sample_clip,
)


def test_clips_are_a_function_of_the_seed_and_the_questions_are_true():
    clips = ShapesWorldClips(ClipConfig(), split="val", size=40)
    a, b = clips.clip(3), ShapesWorldClips(ClipConfig(), split="val", size=40).clip(3)
    assert a == b and clips.clip(4) != a
    kinds = set()
    for i in range(40):
        clip = clips.clip(i)
        names = [o.name for o in clip.objects]
        assert len(set(names)) == len(names) >= 2
        appear = [o.appear for o in clip.objects]
        assert len(set(appear)) == len(appear)
        assert sum(o.tone == "high" for o in clip.objects) == 1
        for qa in clip_questions(clip):
            kinds.add(qa.kind)
            order = sorted(clip.objects, key=lambda o: o.appear)
            if qa.kind == "first":
                assert qa.answer == order[0].obj.shape
            if qa.kind == "av":
                assert qa.answer == next(o for o in clip.objects if o.tone == "high").obj.shape
            if qa.kind == "order":
                x, y = [o for o in clip.objects if o.name in qa.question]
                first_named = x if qa.question.index(x.name) < qa.question.index(y.name) else y
                other = y if first_named is x else x
                assert qa.answer == ("yes" if first_named.appear < other.appear else "no")
    assert kinds == set(KINDS)
    assert clip_caption(clips.clip(0)).count("appears") == len(clips.clip(0).objects)


def test_a_common_lifetime_removes_the_longest_seen_shortcut_and_none_keeps_the_older_clips():
    cfg = ClipConfig()
    clips = ShapesWorldClips(cfg, split="val", size=300)
    frames = cfg.num_frames
    for i in range(300):
        clip = clips.clip(i)
        assert {o.disappear - o.appear for o in clip.objects} == {4}  # 2 s at 2 fps, every object
        # played backwards it is another clip of the same kind (appearances inside the range the generator
        # draws from, distinct) with the same frames, first and last swapped: order-blind, "first" is a coin toss
        backwards = {o.name: frames - o.disappear for o in clip.objects}
        assert len(set(backwards.values())) == len(backwards) and 0 <= min(backwards.values())
        assert max(backwards.values()) <= frames - 4
        seen = sorted(sorted(o.name for o in clip.visible_at(f)) for f in range(frames))
        seen_backwards = sorted(sorted(n for n, a in backwards.items() if a <= f < a + 4) for f in range(frames))
        assert seen == seen_backwards
        order = sorted(clip.objects, key=lambda o: o.appear)
        assert min(backwards, key=backwards.get) == order[-1].name
        assert any(qa.kind == "motion" for qa in clip_questions(clip)) or all(
            max(abs(v) for v in o.obj.velocity) < 0.03 for o in clip.objects)
    # the older clips (lifetime None), kept for their results: there the longest-seen object is the first to
    # appear in most clips, an answer to "first" that needs no order
    old = ShapesWorldClips(ClipConfig(lifetime=None), split="val", size=300)
    pinned = [(o.name, o.appear, o.disappear) for o in sample_clip(20_000_011, ClipConfig(lifetime=None)).objects]
    assert pinned == [("green hexagon", 0, 4), ("blue star", 1, 8), ("purple diamond", 2, 8)]  # as made before

    def longest_seen_is_first(clip) -> bool:
        seen = sorted(((o.disappear - o.appear), o.appear) for o in clip.objects)
        return seen[-1][0] > seen[-2][0] and seen[-1][1] == min(o.appear for o in clip.objects)

    assert sum(longest_seen_is_first(old.clip(i)) for i in range(300)) > 0.7 * 300
    for bad in (0.25, 3.5, 0.0, "2", True, float("nan")):  # half a frame; too few frames to appear at; ...
        with pytest.raises(ValueError, match="ClipConfig.lifetime"):
            ClipConfig(lifetime=bad)


def test_frames_show_objects_only_while_visible_and_tones_sound_at_appearances():
    cfg = ClipConfig()
    clip = ShapesWorldClips(cfg, split="test", size=5).clip(2)
    frames = clip_frames(clip, 48)
    assert len(frames) == cfg.num_frames == 8 and frames[0].size == (48, 48)
    background = np.array(frames[0]).reshape(-1, 3)
    first = min(o.appear for o in clip.objects)
    if first > 0:  # nothing on screen before the first appearance
        assert (np.abs(background - background[0]).max()) == 0
    audio = clip_audio(clip)
    assert audio.dtype == np.float32 and audio.shape == (int(cfg.duration * cfg.sample_rate),)
    for o in clip.objects:
        start = int(o.appear / cfg.fps * cfg.sample_rate)
        burst = audio[start + 800:start + 3200]
        spectrum = np.abs(np.fft.rfft(burst))
        peak_hz = np.argmax(spectrum) * cfg.sample_rate / len(burst)
        expected = cfg.tones[1] if o.tone == "high" else cfg.tones[0]
        assert abs(peak_hz - expected) < 15


def test_synchronise_aligns_audio_to_frames():
    visual = torch.randn(4, 32, 6)
    audio = torch.randn(100, 3)  # 2 s at 50 Hz
    tokens = synchronise(visual, audio, fps=2, audio_rate=50)
    assert tokens.shape == (4, 32, 9)
    assert torch.equal(tokens[:, :, :6], visual)
    assert torch.equal(tokens[1, :25, 6:], audio[25:50]) and (tokens[1, 25:, 6:] == 0).all()  # zero-padded to 32
    pooled = synchronise(torch.randn(4, 9, 6), audio, fps=2, audio_rate=50)  # 25 audio states -> 9 tokens
    assert pooled.shape == (4, 9, 9)
    torch.testing.assert_close(pooled[0, :, 6:].mean(0), audio[:25].mean(0), atol=0.2, rtol=0)
    still = synchronise(torch.randn(1, 32, 6), audio, fps=2, audio_rate=50)  # a still image over 2 s of audio
    assert still.shape == (4, 32, 9) and torch.equal(still[0, :, :6], still[3, :, :6])
    no_audio = synchronise(visual, None, audio_dim=3)
    assert no_audio.shape == (4, 32, 9) and (no_audio[..., 6:] == 0).all()
    no_video = synchronise(None, audio, visual_dim=6, tokens_per_frame=32)
    assert no_video.shape == (4, 32, 9) and (no_video[..., :6] == 0).all()
    short = synchronise(visual, audio[:30])  # audio shorter than the video: zeros after it
    assert (short[2:, :, 6:] == 0).all()
    with pytest.raises(ValueError, match="whole number of audio states per frame"):
        synchronise(visual, audio, fps=3, audio_rate=50)
    with pytest.raises(ValueError, match="at least one"):
        synchronise(None, None)
