"""Datasets: ShapesWorld (procedural scenes with exact ground truth) and COCO-captions / VQA formats."""

from .formats import CocoCaptions, VQADataset, export_coco_captions, export_refcoco, export_vqa
from .shapes import (
    COLOURS,
    SHAPES,
    SPLIT_SEED_RANGES,
    TEXTURES,
    Scene,
    SceneObject,
    ShapesWorldConfig,
    render_masks,
    render_scene,
    sample_scene,
)
from .shapes_language import (
    QA,
    Ref,
    attribute_hits,
    caption,
    captions,
    qa_pairs,
    referring_expressions,
    relation,
    tokenize,
    vocabulary,
)
from .shapesworld import ShapesWorld

__all__ = [
    "COLOURS",
    "QA",
    "SHAPES",
    "SPLIT_SEED_RANGES",
    "TEXTURES",
    "CocoCaptions",
    "Ref",
    "Scene",
    "SceneObject",
    "ShapesWorld",
    "ShapesWorldConfig",
    "VQADataset",
    "attribute_hits",
    "caption",
    "captions",
    "export_coco_captions",
    "export_refcoco",
    "export_vqa",
    "qa_pairs",
    "referring_expressions",
    "relation",
    "render_masks",
    "render_scene",
    "sample_scene",
    "tokenize",
    "vocabulary",
]
