"""Data sources for the vision->LLM recipes: one protocol, one registry, each source with its own options.

    data = DataConfig(source="coco", split="val", size=500, options={"captions": "ann.json", "images": "val2017/"})
    source = open_source(data)          # -> CocoSource
    source.image(0), source.caption(0), source.references(0), source.examples(...)

A source says which image (by index), which texts go with it and how it turns into training examples;
everything else (feature caches, training, evaluation) goes through this protocol, never through a test of
``data.source``. A new source (video clips, referring masks) is a subclass registered in :data:`SOURCES`
with its options dataclass; ``data.options`` are checked against it (unknown keys get a did-you-mean).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import numpy as np

from ..config import StrictConfig, parse_override
from ..registry import Registry

TASKS = ("caption", "vqa")


@dataclass
class DataConfig(StrictConfig):
    """Where the images and texts come from.

    source: a registered source ("shapesworld", "coco", "vqa"); options: that source's own settings (see
    its ``Options`` class). split / size: which part and how many images (at most, for file sources).
    tasks: examples per image per epoch by kind, e.g. {"caption": 1, "vqa": 2}. feature_cache: folder of
    cached encoder features. seed: the example sampling.
    """

    source: str = "shapesworld"
    split: str = "train"
    size: int = 4000
    options: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=lambda: {"caption": 1, "vqa": 1})
    feature_cache: str = "outputs/features"
    seed: int = 0

    def __post_init__(self) -> None:
        cls = SOURCES.get(self.source, what="data.source")
        cls.Options.from_dict(self.options)  # unknown or ill-typed options fail now, before any work
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"data.tasks accepts {list(TASKS)}, got {sorted(unknown)}")
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in self.tasks.values()):
            raise ValueError(f"data.tasks values are examples per image (integers >= 0), got {self.tasks}")
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"data.size must be an integer >= 1, got {self.size!r}")


@dataclass
class Example:
    index: int  # image index into the feature tensor
    prompt: str
    target: str
    align: str | None  # caption paired with the image (None: no image-text objective for this sample)
    kind: str  # "caption" or "vqa:<question type>"


@dataclass
class Question:
    question: str
    answers: list[str]
    kind: str


class DataSource:
    """Base of every source: images by index, their texts, and training examples."""

    name: ClassVar[str] = ""

    @dataclass
    class Options(StrictConfig):
        """This source's own settings (``data.options``)."""

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        self.options = self.Options.from_dict(config.options)

    def __len__(self) -> int:
        raise NotImplementedError

    def item_id(self, i: int) -> str:
        """A stable id of image i (the feature cache checks them)."""
        raise NotImplementedError

    def ids(self) -> list[str]:
        return [self.item_id(i) for i in range(len(self))]

    def image(self, i: int):
        """Image i as a PIL image."""
        raise NotImplementedError

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image i (sources that know it without decoding override this)."""
        return tuple(self.image(i).size)

    def references(self, i: int) -> list[str]:
        """Every reference caption of image i (CIDEr); [] when the source has none."""
        return []

    def caption(self, i: int) -> str | None:
        """The one caption paired with image i (alignment objectives, retrieval), or None."""
        return None

    def questions(self, i: int, per_image: int) -> list[Question]:
        """Up to ``per_image`` evaluation questions about image i (deterministic)."""
        return []

    def attribute_hits(self, i: int, text: str) -> tuple[int, int] | None:
        """(objects whose colour and shape ``text`` states, objects) where the source knows them, else None."""
        return None

    def signature(self) -> dict:
        """What identifies the images (with the encoder it names a feature cache)."""
        cfg = self.config
        return {"source": cfg.source, "split": cfg.split, "size": cfg.size, **self.options.to_dict()}

    def examples(self, *, caption_prompt: str, vqa_prompt: str, seed: int | None = None) -> list[Example]:
        """Training examples for every image, ``data.tasks`` of each kind per image."""
        raise NotImplementedError


SOURCES: Registry[type[DataSource]] = Registry("data source")


def open_source(config: DataConfig) -> DataSource:
    """The source ``config`` names, ready to read."""
    return SOURCES.get(config.source, what="data.source")(config)


def _vqa_prompt(template: str, question: str) -> str:
    return template.replace("{question}", question)


def _task_examples(source: DataSource, texts, caption_prompt: str, vqa_prompt: str, seed: int | None) -> list[Example]:
    """``data.tasks`` examples per item of a procedural source: ``texts(i, with_qa)`` gives item i's caption and
    (when asked) its QA pairs, from which ``tasks["vqa"]`` are drawn with one RNG seeded by ``seed`` / data.seed."""
    cfg = source.config
    rng = random.Random(cfg.seed if seed is None else seed)
    n_cap, n_vqa = int(cfg.tasks.get("caption", 0)), int(cfg.tasks.get("vqa", 0))
    out: list[Example] = []
    for i in range(len(source)):
        cap, qas = texts(i, n_vqa > 0)
        out += [Example(i, caption_prompt, cap, cap, "caption")] * n_cap
        for qa in rng.sample(qas, min(n_vqa, len(qas))) if n_vqa else []:
            out.append(Example(i, _vqa_prompt(vqa_prompt, qa.question), qa.answer, cap, f"vqa:{qa.kind}"))
    return out


# ---------------------------------------------------------------------- ShapesWorld
class ShapesWorldSource(DataSource):
    """Procedural scenes with exact ground truth: captions from a grammar, QA, attribute checks."""

    name = "shapesworld"

    @dataclass
    class Options(StrictConfig):
        render_size: int = 224
        max_objects: int = 3

    def __init__(self, config: DataConfig) -> None:
        from .shapes import ShapesWorldConfig
        from .shapesworld import ShapesWorld

        super().__init__(config)
        world = ShapesWorldConfig(image_size=self.options.render_size, max_objects=self.options.max_objects)
        self.dataset = ShapesWorld(world, split=config.split, size=config.size)

    def __len__(self) -> int:
        return len(self.dataset)

    def item_id(self, i: int) -> str:
        return f"{self.config.split}-{i:06d}"

    def image(self, i: int):
        from .shapes import render_scene

        return render_scene(self.dataset.scene(i), self.options.render_size)

    def image_size(self, i: int) -> tuple[int, int]:
        return (self.options.render_size, self.options.render_size)

    def references(self, i: int) -> list[str]:
        from .shapes_language import captions

        return captions(self.dataset.scene(i))

    def caption(self, i: int) -> str | None:
        from .shapes_language import caption

        return caption(self.dataset.scene(i))

    def questions(self, i: int, per_image: int) -> list[Question]:
        from .shapes_language import qa_pairs

        seed = self.dataset.seed_of(i)
        pairs = qa_pairs(self.dataset.scene(i), seed=seed)
        return [Question(qa.question, [qa.answer], qa.kind)
                for qa in random.Random(seed).sample(pairs, min(per_image, len(pairs)))]

    def attribute_hits(self, i: int, text: str) -> tuple[int, int] | None:
        from .shapes_language import attribute_hits

        return attribute_hits(text, self.dataset.scene(i))

    def examples(self, *, caption_prompt: str, vqa_prompt: str, seed: int | None = None) -> list[Example]:
        from .shapes_language import caption, qa_pairs

        def texts(i: int, with_qa: bool):
            scene = self.dataset.scene(i)
            return caption(scene), qa_pairs(scene, seed=self.dataset.seed_of(i)) if with_qa else []

        return _task_examples(self, texts, caption_prompt, vqa_prompt, seed)


# ---------------------------------------------------------------------- files
class _FileSource(DataSource):
    def _check(self, required: Sequence[str]) -> None:
        missing = [k for k in required if not getattr(self.options, k)]
        if missing:
            raise ValueError(f"data.source={self.name} needs data.options.{', data.options.'.join(missing)}")

    def __len__(self) -> int:
        return min(len(self.dataset), self.config.size)

    def item_id(self, i: int) -> str:
        return str(self.dataset[i]["id"])

    def image(self, i: int):
        return self.dataset[i]["image"]


class CocoSource(_FileSource):
    """COCO-captions JSON (``annotations`` with ``image_id`` + ``caption``) and its image folder."""

    name = "coco"

    @dataclass
    class Options(StrictConfig):
        captions: str | None = None
        images: str | None = None

    def __init__(self, config: DataConfig) -> None:
        from .formats import CocoCaptions

        super().__init__(config)
        self._check(("captions", "images"))
        self.dataset = CocoCaptions(self.options.captions, self.options.images)

    def references(self, i: int) -> list[str]:
        item = self.dataset[i]
        return list(item.get("captions") or [item["caption"]])

    def caption(self, i: int) -> str | None:
        return self.dataset[i]["caption"]

    def examples(self, *, caption_prompt: str, vqa_prompt: str, seed: int | None = None) -> list[Example]:
        cfg = self.config
        rng = random.Random(cfg.seed if seed is None else seed)
        out = []
        for i in range(len(self)):
            caps = self.references(i)
            for _ in range(max(int(cfg.tasks.get("caption", 0)), 1)):
                cap = rng.choice(caps)
                out.append(Example(i, caption_prompt, cap, cap, "caption"))
        return out


class VQASource(_FileSource):
    """VQAv2-style questions + annotations JSON and the image folder; questions only."""

    name = "vqa"

    @dataclass
    class Options(StrictConfig):
        questions: str | None = None
        annotations: str | None = None
        images: str | None = None

    def __init__(self, config: DataConfig) -> None:
        from .formats import VQADataset

        super().__init__(config)
        self._check(("questions", "annotations", "images"))
        self.dataset = VQADataset(self.options.questions, self.options.annotations, self.options.images)

    def questions(self, i: int, per_image: int) -> list[Question]:
        item = self.dataset[i]
        return [Question(item["question"], list(item["answers"]), item.get("question_type", ""))][:per_image]

    def examples(self, *, caption_prompt: str, vqa_prompt: str, seed: int | None = None) -> list[Example]:
        out = []
        for i in range(len(self)):
            item = self.dataset[i]
            out.append(Example(i, _vqa_prompt(vqa_prompt, item["question"]), item["answer"], None,
                               f"vqa:{item.get('question_type', '')}"))
        return out


# ---------------------------------------------------------------------- ShapesWorld clips
class ShapesWorldClipsSource(DataSource):
    """ShapesWorld clips (:mod:`mmkit.data.clips`): each item is a :class:`~mmkit.encoders.av.MediaClip` of
    rendered frames and the audio track; questions on order, motion and sound; the caption tells the clip."""

    name = "shapesworld_clips"

    @dataclass
    class Options(StrictConfig):
        render_size: int = 224
        fps: float = 2.0
        duration: float = 4.0
        lifetime: float | None = 2.0  # seconds every object stays; None: the clips before 2026-11-30
        max_objects: int = 3
        audio: bool = True

    def __init__(self, config: DataConfig) -> None:
        from .clips import ClipConfig, ShapesWorldClips, _clip_world

        super().__init__(config)
        o = self.options
        world = _clip_world().replace(image_size=o.render_size, max_objects=o.max_objects)
        clips = ClipConfig(world=world, fps=o.fps, duration=o.duration, lifetime=o.lifetime)
        self.dataset = ShapesWorldClips(clips, split=config.split, size=config.size)

    def __len__(self) -> int:
        return len(self.dataset)

    def signature(self) -> dict:
        """As every source's, without ``lifetime`` when it is None: the older clips keep their feature caches."""
        signature = super().signature()
        if signature.get("lifetime", 0) is None:
            del signature["lifetime"]
        return signature

    def item_id(self, i: int) -> str:
        return f"{self.config.split}-clip-{i:06d}"

    def image(self, i: int):
        from ..encoders.av import MediaClip
        from .clips import clip_audio, clip_frames

        clip = self.dataset.clip(i)
        return MediaClip(frames=clip_frames(clip), audio=clip_audio(clip) if self.options.audio else None,
                         fps=self.options.fps, duration=self.options.duration)

    def references(self, i: int) -> list[str]:
        return [self.caption(i)]

    def caption(self, i: int) -> str | None:
        from .clips import clip_caption

        return clip_caption(self.dataset.clip(i))

    def questions(self, i: int, per_image: int) -> list[Question]:
        from .clips import clip_questions

        qas = clip_questions(self.dataset.clip(i))
        picked = random.Random(self.dataset.seed_of(i)).sample(qas, min(per_image, len(qas)))
        return [Question(qa.question, [qa.answer], qa.kind) for qa in picked]

    def examples(self, *, caption_prompt: str, vqa_prompt: str, seed: int | None = None) -> list[Example]:
        from .clips import clip_caption, clip_questions

        def texts(i: int, with_qa: bool):
            clip = self.dataset.clip(i)
            return clip_caption(clip), clip_questions(clip) if with_qa else []

        return _task_examples(self, texts, caption_prompt, vqa_prompt, seed)


# ---------------------------------------------------------------------- referring segmentation
# Referring segmentation sources: an image, an expression that names one object, that object's mask.
#
# Two registered data sources (``data.source``) share the :class:`ReferringSource` protocol the segmentation
# recipe reads (``referrals(i)`` and ``mask(i, referral, size)``), on top of the usual image / caption protocol:
#
# - ``shapesworld_refer``: ShapesWorld scenes with every expression that picks out exactly one object ("the
#   red circle", "the large object", "the object to the left of the blue square") and its exact mask.
# - ``refcoco``: a RefCOCO-style JSON and an image folder, for users' data::
#
#       {"images": [{"id": 1, "file_name": "a.jpg", "height": 480, "width": 640}, ...],
#        "annotations": [{"id": 7, "image_id": 1, "segmentation": [[x0, y0, x1, y1, ...]] or RLE}, ...],
#        "refs": [{"ann_id": 7, "image_id": 1, "split": "val", "sentences": [{"sent": "the man in red"}, ...]}]}
#
#   (the ``refs(unc).p`` and ``instances.json`` of the refer toolkit merged into one file). Masks may be
#   polygons, uncompressed RLE (``counts`` a list) or COCO's compressed RLE string; ``data.split`` keeps the
#   refs of that split (all refs when none has a split).


class Referral(NamedTuple):
    """One expression about image ``index`` naming the object ``target`` (an index the source understands)."""

    index: int
    expression: str
    target: int
    kind: str  # "attribute" / "relation" (ShapesWorld) or "ref" (files)


class ReferringSource(DataSource):
    """The protocol of referring-segmentation sources."""

    def referrals(self, i: int) -> list[Referral]:
        """Every expression about image i with the object it names."""
        raise NotImplementedError

    def mask(self, i: int, referral: Referral, size: tuple[int, int] | int) -> np.ndarray:
        """The named object's mask in image i, (H, W) bool at ``size`` (an int: square)."""
        raise NotImplementedError

    def object_masks(self, i: int, size: tuple[int, int] | int) -> list[np.ndarray] | None:
        """Every object's mask in image i, indexed as ``Referral.target`` (None: this source does not know them)."""
        return None

    def segmentation_examples(self, per_image: int, seed: int | None = None) -> list[Referral]:
        """Up to ``per_image`` referrals per image, drawn with ``seed`` (default ``data.seed``)."""
        rng = random.Random(self.config.seed if seed is None else seed)
        out: list[Referral] = []
        for i in range(len(self)):
            refs = self.referrals(i)
            out += rng.sample(refs, min(per_image, len(refs)))
        return out

    def examples(self, *, caption_prompt: str, vqa_prompt: str, seed: int | None = None) -> list[Example]:
        return []


class ShapesWorldReferSource(ShapesWorldSource, ReferringSource):
    """ShapesWorld scenes with their referring expressions and exact masks (captions and QA as ``shapesworld``)."""

    name = "shapesworld_refer"

    def referrals(self, i: int) -> list[Referral]:
        from .shapes_language import referring_expressions

        # relational expressions name a second object ("the object left of the blue square"): a second "the"
        return [Referral(i, ref.expression, ref.object_index, "relation" if " the " in ref.expression else "attribute")
                for ref in referring_expressions(self.dataset.scene(i))]

    def mask(self, i: int, referral: Referral, size: tuple[int, int] | int) -> np.ndarray:
        return self.object_masks(i, size)[referral.target]

    def object_masks(self, i: int, size: tuple[int, int] | int) -> list[np.ndarray]:
        from .shapes import render_masks

        side = size if isinstance(size, int) else size[0]
        if not isinstance(size, int) and size[0] != size[1]:
            raise ValueError(f"ShapesWorld images are square; got mask size {size}")
        return list(render_masks(self.dataset.scene(i), side))

    def examples(self, *, caption_prompt: str, vqa_prompt: str, seed: int | None = None) -> list[Example]:
        return ShapesWorldSource.examples(self, caption_prompt=caption_prompt, vqa_prompt=vqa_prompt, seed=seed)


class RefCocoSource(ReferringSource):
    """A RefCOCO-style JSON (see the module docstring) and its image folder."""

    name = "refcoco"

    @dataclass
    class Options(StrictConfig):
        refs: str | None = None
        images: str | None = None

    def __init__(self, config: DataConfig) -> None:
        super().__init__(config)
        missing = [k for k in ("refs", "images") if not getattr(self.options, k)]
        if missing:
            raise ValueError(f"data.source=refcoco needs data.options.{', data.options.'.join(missing)}")
        import json
        from pathlib import Path

        path = Path(self.options.refs)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read a RefCOCO-style JSON ({err})") from None
        for key in ("images", "annotations", "refs"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{path}: a RefCOCO-style JSON needs a list under {key!r} (see mmkit.data.sources)")
        required = {"images": ("id", "file_name", "height", "width"), "annotations": ("id", "image_id", "segmentation"),
                    "refs": ("ann_id",)}
        for key, fields in required.items():
            for n, entry in enumerate(data[key]):
                missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
                if missing:
                    raise ValueError(f"{path}: {key}[{n}] lacks {missing}; each of {key} needs {list(fields)}")
        known = {im["id"] for im in data["images"]}
        for n, ann in enumerate(data["annotations"]):
            if ann["image_id"] not in known:
                raise ValueError(f"{path}: annotations[{n}] names image_id {ann['image_id']!r}, which is not in images")
        self.images = {im["id"]: im for im in data["images"]}
        self.annotations = {a["id"]: a for a in data["annotations"]}
        refs = data["refs"]
        if any("split" in r for r in refs):
            refs = [r for r in refs if r.get("split") == config.split]
        by_image: dict[int, list[dict]] = {}
        for r in refs:
            ann = self.annotations.get(r["ann_id"])
            if ann is None:
                raise ValueError(f"{path}: ref of ann_id {r['ann_id']} has no annotation")
            by_image.setdefault(ann["image_id"], []).append(r)
        self.image_ids = sorted(by_image)[: config.size]
        self.refs = by_image
        self.root = Path(self.options.images)

    def __len__(self) -> int:
        return len(self.image_ids)

    def item_id(self, i: int) -> str:
        return str(self.image_ids[i])

    def image(self, i: int):
        from .images import load_image

        return load_image(self.root / self.images[self.image_ids[i]]["file_name"])

    def image_size(self, i: int) -> tuple[int, int]:
        info = self.images[self.image_ids[i]]  # the JSON's own size (its masks are drawn at it)
        return (int(info["width"]), int(info["height"]))

    def referrals(self, i: int) -> list[Referral]:
        out = []
        for r in self.refs[self.image_ids[i]]:
            for s in r.get("sentences", []):
                text = s["sent"] if isinstance(s, dict) else str(s)
                out.append(Referral(i, text.strip(), int(r["ann_id"]), "ref"))
        return out

    def mask(self, i: int, referral: Referral, size: tuple[int, int] | int) -> np.ndarray:
        from PIL import Image

        from .masks import decode_segmentation

        info = self.images[self.image_ids[i]]
        full = decode_segmentation(self.annotations[referral.target]["segmentation"], info["height"], info["width"])
        h, w = (size, size) if isinstance(size, int) else size
        if (h, w) == full.shape:
            return full
        return np.asarray(Image.fromarray(full).resize((w, h), Image.NEAREST), dtype=bool)


for _cls in (ShapesWorldSource, CocoSource, VQASource, ShapesWorldClipsSource, ShapesWorldReferSource,
             RefCocoSource):
    SOURCES.register(_cls.name, _cls)


def source_options(name: str) -> list[str]:
    """The option names source ``name`` accepts."""
    return SOURCES.get(name, what="data.source").Options.field_names()


def parse_source_options(items: Sequence[str], source: str | None = None) -> dict:
    """Command-line ``KEY=VALUE`` source options -> a dict. With ``source`` named, each value is read for its
    option's type: text options (paths, names) verbatim, whole numbers in base 10 (``010`` is 10), anything else
    (``null``, ``false``, ``2.5``) as a YAML scalar like a config override; without it, every value as YAML."""
    import typing

    hints = typing.get_type_hints(SOURCES.get(source, what="data.source").Options) if source else {}
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"source option {item!r} must look like KEY=VALUE, e.g. lifetime=null")
        kinds = (typing.get_args(hints[key]) or (hints[key],)) if key in hints else ()
        if str in kinds and raw not in ("null", "~"):
            options[key] = raw  # a path such as "set #2/a.json" or "1e5" stays text
        elif int in kinds and raw.strip().lstrip("-").isdigit():
            options[key] = int(raw)
        else:
            options[key] = parse_override(f"x={raw}")[1]
    return options


__all__ = ["SOURCES", "DataConfig", "DataSource", "Example", "Question", "ReferringSource", "Referral", "open_source",
           "parse_source_options", "source_options"]
