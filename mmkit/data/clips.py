"""ShapesWorld clips: objects appear, move and disappear over frames, with an audio track of tones.

A clip is a pure function of its seed (split by seed like ShapesWorld scenes). Two to ``max_objects``
objects with distinct (colour, shape) names each appear at their own frame, move linearly, and stay
visible for the same ``lifetime`` (so how long an object is seen says nothing about when it appeared).
Every appearance sounds a short tone: exactly one object's is the *high* tone, the others' the low one.
Questions need time or sound to answer:

- ``first`` / ``last``: "which shape appeared first?" -> "circle" (the order of appearance);
- ``order``: "did the red circle appear before the blue star?" -> "yes" / "no";
- ``motion``: "where did the red circle move?" -> "left" / "right" / "up" / "down" (its dominant direction);
- ``av``: "which shape appeared when the high tone sounded?" -> "star" (audio-visual matching).

    clip = sample_clip(20_000_123, ClipConfig())
    frames = clip_frames(clip, 224)        # fps * duration PIL images
    audio = clip_audio(clip)               # (duration * 16 kHz,) float32
    qas = clip_questions(clip)             # [QA(question, answer, kind), ...]
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np

from ..config import StrictConfig
from .shapes import SPLIT_SEED_RANGES, Scene, SceneObject, ShapesWorldConfig, render_scene, sample_scene
from .shapes_language import QA

KINDS = ("first", "last", "order", "motion", "av")
MIN_MOTION = 0.03  # image fractions per second along the dominant axis for a "where did it move" question


def _clip_world() -> ShapesWorldConfig:
    return ShapesWorldConfig(image_size=224, min_objects=2, max_objects=3, max_speed=0.06)


@dataclass
class ClipConfig(StrictConfig):
    """world: the scenes (at least two objects, moving: ``max_speed`` in image fractions per second);
    fps and duration (seconds) give the frames; lifetime: how long (seconds, whole frames) every object stays
    visible; tones: (low, high) Hz, each ``tone_seconds`` long at the frame an object appears; sample_rate of
    the audio; noise: its background noise level.

    ``lifetime=None`` gives the clips of mmkit before 2026-11-30: an object stays to the end (60%) or leaves
    after two frames or more. There the first object to appear is usually the one seen longest (the object in
    the most frames answers "which appeared first?" in 82% of clips), so an order-blind model answers most
    "first" questions. With a common lifetime, a clip played backwards is another clip of the same kind with
    the same set of frames and first and last swapped: without the frames' order, "first" / "last" / "did A
    appear before B" are a coin toss at best. Objects visible for fewer than 3 frames get no motion question."""

    world: ShapesWorldConfig = field(default_factory=_clip_world)
    fps: float = 2.0
    duration: float = 4.0
    lifetime: float | None = 2.0
    tones: tuple[float, float] = (330.0, 880.0)
    tone_seconds: float = 0.3
    sample_rate: int = 16_000
    noise: float = 0.01

    def __post_init__(self) -> None:
        self.tones = tuple(self.tones)
        if self.world.min_objects < 2:
            raise ValueError("ClipConfig.world.min_objects must be >= 2 (order questions compare two objects)")
        frames = self.fps * self.duration
        if abs(frames - round(frames)) > 1e-9 or frames < self.world.max_objects + 1:
            raise ValueError(f"ClipConfig: fps * duration must be a whole number of frames, at least "
                             f"max_objects + 1 = {self.world.max_objects + 1}; got {frames:g}")
        if self.lifetime is not None:
            if isinstance(self.lifetime, bool) or not isinstance(self.lifetime, (int, float)) \
                    or not np.isfinite(self.lifetime):
                raise ValueError(f"ClipConfig.lifetime must be a number of seconds or None, got {self.lifetime!r}")
            lifetime = self.fps * self.lifetime
            slots = round(frames) - round(lifetime) + 1  # frames an object can appear at and still stay its lifetime
            if abs(lifetime - round(lifetime)) > 1e-9 or lifetime < 1 or slots < self.world.max_objects:
                raise ValueError(
                    f"ClipConfig.lifetime: fps * lifetime must be a whole number of frames, at least 1, leaving "
                    f"max_objects = {self.world.max_objects} distinct frames to appear at within the "
                    f"{round(frames)} frames (at most {round(frames) - self.world.max_objects + 1} frames); "
                    f"got {self.lifetime:g} s = {lifetime:g} frames; or None for the older clips")
        if len(self.tones) != 2 or not 0 < self.tones[0] < self.tones[1] < self.sample_rate / 2:
            raise ValueError(f"ClipConfig.tones must be (low, high) Hz below the Nyquist rate, got {self.tones}")

    @property
    def num_frames(self) -> int:
        return int(round(self.fps * self.duration))

    @property
    def lifetime_frames(self) -> int | None:
        return None if self.lifetime is None else int(round(self.fps * self.lifetime))


@dataclass(frozen=True)
class ClipObject:
    """An object of a clip: the scene object (position at t = 0, velocity per second), the frames it is
    visible in (``appear`` <= frame < ``disappear``) and the tone of its appearance ("high" or "low")."""

    obj: SceneObject
    appear: int
    disappear: int
    tone: str

    @property
    def name(self) -> str:
        return f"{self.obj.colour} {self.obj.shape}"


@dataclass(frozen=True)
class Clip:
    objects: tuple[ClipObject, ...]
    scene: Scene
    config: ClipConfig
    seed: int

    def visible_at(self, frame: int) -> list[ClipObject]:
        return [o for o in self.objects if o.appear <= frame < o.disappear]


def sample_clip(seed: int, cfg: ClipConfig | None = None) -> Clip:
    """The clip of ``seed``: a pure function of (seed, cfg)."""
    cfg = cfg if cfg is not None else ClipConfig()
    scene = sample_scene(seed, cfg.world)
    rng = random.Random(f"{seed}/clip")
    # distinct names: a repeated (colour, shape) would make the questions ambiguous
    objects, names = [], set()
    for obj in scene.objects:
        while (obj.colour, obj.shape) in names:
            obj = dataclasses.replace(obj, colour=rng.choice(cfg.world.colours), shape=rng.choice(cfg.world.shapes))
        names.add((obj.colour, obj.shape))
        objects.append(obj)
    frames, life = cfg.num_frames, cfg.lifetime_frames
    last = frames - 1 if life is None else frames - life + 1  # appearance frames: range(0, last)
    appear = sorted(rng.sample(range(0, last), len(objects)))  # distinct frames: a strict order
    rng.shuffle(objects)
    high = rng.randrange(len(objects))
    clip_objects = []
    for i, (obj, start) in enumerate(zip(objects, appear)):
        if life is not None:
            end = start + life
        else:  # the older clips: stays, or leaves after >= 2 frames
            end = frames if rng.random() < 0.6 else rng.randint(start + 2, frames)
        clip_objects.append(ClipObject(obj=obj, appear=start, disappear=end, tone="high" if i == high else "low"))
    return Clip(objects=tuple(clip_objects), scene=dataclasses.replace(scene, objects=tuple(objects)), config=cfg,
                seed=int(seed))


def clip_frames(clip: Clip, size: int | None = None) -> list:
    """The clip's frames as PIL images (``fps * duration`` of them), ``size`` pixels per side."""
    cfg = clip.config
    size = size or cfg.world.image_size
    frames = []
    for f in range(cfg.num_frames):
        t = f / cfg.fps
        visible = tuple(o.obj.at(t) for o in clip.visible_at(f))
        frames.append(render_scene(dataclasses.replace(clip.scene, objects=visible), size))
    return frames


def clip_audio(clip: Clip) -> np.ndarray:
    """The audio track (duration * sample_rate,) float32: a tone (low or high) when each object appears."""
    cfg = clip.config
    n = int(round(cfg.duration * cfg.sample_rate))
    rng = np.random.default_rng(clip.seed)
    audio = (cfg.noise * rng.standard_normal(n)).astype(np.float32)
    length = int(cfg.tone_seconds * cfg.sample_rate)
    t = np.arange(length) / cfg.sample_rate
    envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)  # 20 ms ramps, no clicks
    for o in clip.objects:
        start = int(o.appear / cfg.fps * cfg.sample_rate)
        hz = cfg.tones[1] if o.tone == "high" else cfg.tones[0]
        tone = (0.5 * envelope * np.sin(2 * np.pi * hz * t)).astype(np.float32)
        end = min(n, start + length)
        audio[start:end] += tone[: end - start]
    return audio


def _direction(obj: SceneObject) -> str:
    vx, vy = obj.velocity
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def clip_questions(clip: Clip) -> list[QA]:
    """Every question of the clip with its answer (see the module docstring for the kinds)."""
    order = sorted(clip.objects, key=lambda o: o.appear)
    qas = [
        QA("which shape appeared first?", order[0].obj.shape, "first"),
        QA("which shape appeared last?", order[-1].obj.shape, "last"),
    ]
    rng = random.Random(f"{clip.seed}/questions")
    a, b = rng.sample(list(clip.objects), 2)
    qas.append(QA(f"did the {a.name} appear before the {b.name}?", "yes" if a.appear < b.appear else "no", "order"))
    movers = [o for o in clip.objects  # visibly moving: at least 3 frames, a clear dominant direction
              if o.disappear - o.appear >= 3 and max(abs(v) for v in o.obj.velocity) >= MIN_MOTION]
    if movers:
        mover = rng.choice(movers)
        qas.append(QA(f"where did the {mover.name} move?", _direction(mover.obj), "motion"))
    high = next(o for o in clip.objects if o.tone == "high")
    qas.append(QA("which shape appeared when the high tone sounded?", high.obj.shape, "av"))
    return qas


def clip_caption(clip: Clip) -> str:
    """The clip told in order of appearance: 'a red circle appears, then a blue star appears with a high tone'."""
    parts = []
    for o in sorted(clip.objects, key=lambda o: o.appear):
        parts.append(f"a {o.name} appears" + (" with a high tone" if o.tone == "high" else ""))
    return ", then ".join(parts)


class ShapesWorldClips:
    """Clips of a split: item ``i`` is the clip of seed ``SPLIT_SEED_RANGES[split][0] + i``."""

    def __init__(self, cfg: ClipConfig | None = None, split: str = "train", size: int = 1000) -> None:
        if split not in SPLIT_SEED_RANGES:
            raise ValueError(f"ShapesWorldClips: unknown split {split!r}; accepted: {list(SPLIT_SEED_RANGES)}")
        self.cfg = cfg if cfg is not None else ClipConfig()
        self.split, self.size = split, int(size)

    def __len__(self) -> int:
        return self.size

    def seed_of(self, i: int) -> int:
        if not 0 <= i < self.size:
            raise IndexError(f"ShapesWorldClips({self.split}): index {i} out of range for size {self.size}")
        return SPLIT_SEED_RANGES[self.split][0] + i

    def clip(self, i: int) -> Clip:
        return sample_clip(self.seed_of(i), self.cfg)


__all__ = ["KINDS", "Clip", "ClipConfig", "ClipObject", "ShapesWorldClips", "clip_audio", "clip_caption",
           "clip_frames", "clip_questions", "sample_clip"]
