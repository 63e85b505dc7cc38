"""Paths of the models shipped in the repository's ``assets/`` folder (made by mmkit's own recipes)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_CONNECTOR = ASSETS / "connectors" / "shapes-vlap"  # VLAP connector, EfficientNet-Lite0 -> SmolLM2-135M
DEFAULT_VIDEO_MODEL = ASSETS / "connectors" / "shapes-video-qa"  # Q-Former (best measured variant) on ShapesWorld clips
DEFAULT_SEG_MODEL = ASSETS / "segment" / "shapes-read"  # READ on ShapesWorld referring expressions
DEFAULT_T2I_MODEL = ASSETS / "t2i" / "shapes"  # ShapesWorld pixel-space text-to-image pipeline

ASSET_PREFIX = "asset:"
DEFAULT_SAM = ASSET_PREFIX + "segment/sam-shapes"  # the small ShapesWorld SAM (recipes/segment/pretrain_sam.py)


def resolve_asset(name: str) -> str:
    """``"asset:<folder>"`` -> that folder under ``assets/`` (a portable name for configs and bundles, which must
    not hold one machine's absolute path); any other name is returned as is."""
    if not name.startswith(ASSET_PREFIX):
        return name
    relative = Path(name[len(ASSET_PREFIX):])
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"{name!r}: an asset name is 'asset:<folder under assets/>', e.g. {DEFAULT_SAM!r}")
    path = ASSETS / relative
    if not path.exists():
        raise ValueError(f"{name!r}: no {path}; shipped assets are the folders under {ASSETS}")
    return str(path)
