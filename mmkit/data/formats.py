"""COCO-captions and VQAv2 files: export ShapesWorld (or any dataset yielding the same item dicts) and
load real-format data, so recipes run unchanged on a user's own images.

COCO captions (``captions.json``)::

    {"images": [{"id", "file_name", "width", "height"}], "annotations": [{"id", "image_id", "caption"}]}

VQA v2 (``questions.json`` + ``annotations.json``)::

    {"questions": [{"image_id", "question", "question_id"}]}
    {"annotations": [{"question_id", "image_id", "question_type", "answer_type",
                      "multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"}]}]}

Our VQA export also puts a COCO-style ``images`` list in ``questions.json`` (real VQA files lean on COCO's
file naming instead), which :class:`VQADataset` uses to find image files when no ``image_file`` pattern
is given. Exports write images to ``folder/images/<item id>.png``.

Loaders read their JSON on first use (``len``, indexing or an explicit ``.load()``), never in the
constructor, and open each image only when its item is fetched.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mmkit.config import atomic_write_text

from .shapes import render_scene
from .shapes_language import NUMBER_WORDS

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VQA_ANSWERS_PER_QUESTION = 10  # VQAv2 collects ten human answers per question


# --------------------------------------------------------------------------------------------------
# Export


def _export_images(dataset: Any, folder: Path, image_size: int | None, fn: str) -> list[tuple[dict, dict]]:
    """Write every item's image to ``folder/images``; return (item, COCO image entry) per item."""
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"{fn}: image_size must be None or a positive int, got {image_size!r}")
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for index in range(len(dataset)):
        item = dataset[index]
        item_id = str(item["id"])
        if not _SAFE_ID.match(item_id):
            raise ValueError(
                f"{fn}: item {index} has id {item_id!r}; ids become file names and may only contain "
                "letters, digits, '.', '_' and '-'"
            )
        if image_size is None:
            image = item["image"].convert("RGB")
        elif "scene" in item:
            image = render_scene(item["scene"], image_size)  # re-render: sharper than resizing
        else:
            image = item["image"].convert("RGB").resize((image_size, image_size), Image.BICUBIC)
        file_name = f"{item_id}.png"
        image.save(image_dir / file_name, format="PNG")
        entry = {"id": index, "file_name": file_name, "width": image.width, "height": image.height}
        out.append((item, entry))
    return out


def export_coco_captions(dataset: Any, folder: str | os.PathLike, image_size: int | None = None) -> Path:
    """Write ``folder/images/<id>.png`` and ``folder/captions.json`` (COCO captions format).

    ``dataset`` yields dicts with ``id``, ``image`` and ``captions`` (or just ``caption``), such as
    :class:`~mmkit.data.shapes.ShapesWorld`. Image ids are positions in ``dataset``; every caption variant
    becomes one annotation, canonical first. ``image_size``: re-render ShapesWorld scenes at that size
    (other images are resized to a square). Returns the path of ``captions.json``.
    Read it back with ``CocoCaptions(path, folder / "images")``.
    """
    folder = Path(folder)
    images, annotations = [], []
    for item, entry in _export_images(dataset, folder, image_size, "export_coco_captions"):
        texts = item.get("captions") or [item["caption"]]
        images.append(entry)
        for text in texts:
            annotations.append({"id": len(annotations), "image_id": entry["id"], "caption": text})
    path = folder / "captions.json"
    info = {"description": "exported by mmkit.data.export_coco_captions"}
    atomic_write_text(path, json.dumps({"info": info, "images": images, "annotations": annotations}))
    return path


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE of a bool mask: run lengths down the columns, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def export_refcoco(dataset: Any, folder: str | os.PathLike, split: str = "val") -> Path:
    """Write ``folder/images/<id>.png`` and ``folder/refs.json`` (the RefCOCO-style JSON ``data.source=refcoco``
    reads; see :mod:`mmkit.data.sources`): every referring expression of every ShapesWorld item with its
    object's exact mask as uncompressed RLE, all refs in ``split``. Returns the path of ``refs.json``."""
    from .shapes import render_masks

    folder = Path(folder)
    images, annotations, refs = [], [], []
    for item, entry in _export_images(dataset, folder, None, "export_refcoco"):
        images.append(entry)
        masks = render_masks(item["scene"], entry["width"])
        ann_ids = {}
        for k, mask in enumerate(masks):
            ann_ids[k] = len(annotations)
            annotations.append({"id": len(annotations), "image_id": entry["id"],
                                "segmentation": {"counts": _rle_counts(mask), "size": list(mask.shape)}})
        by_object: dict[int, list[dict]] = {}
        for ref in item["refs"]:
            by_object.setdefault(ref.object_index, []).append({"sent": ref.expression})
        for k, sentences in by_object.items():
            refs.append({"ref_id": len(refs), "ann_id": ann_ids[k], "image_id": entry["id"], "split": split,
                         "sentences": sentences})
    path = folder / "refs.json"
    info = {"description": "exported by mmkit.data.export_refcoco"}
    atomic_write_text(path, json.dumps({"info": info, "images": images, "annotations": annotations, "refs": refs}))
    return path


def _answer_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in NUMBER_WORDS or answer.isdigit():
        return "number"
    return "other"


def export_vqa(dataset: Any, folder: str | os.PathLike, image_size: int | None = None) -> tuple[Path, Path]:
    """Write ``folder/images/<id>.png``, ``folder/questions.json`` and ``folder/annotations.json`` (VQAv2).

    ``dataset`` yields dicts with ``id``, ``image`` and ``qa`` (a list of ``QA(question, answer, kind)``
    or ``(question, answer)`` pairs). ``question_type`` is the QA kind ('colour', 'count', ...;
    'other' for plain pairs), ``answer_type`` is 'yes/no', 'number' or 'other', and the ten answers all
    equal the ground truth. Returns the two JSON paths; read back with
    ``VQADataset(questions, annotations, folder / "images")``.
    """
    folder = Path(folder)
    images, questions, annotations = [], [], []
    for item, entry in _export_images(dataset, folder, image_size, "export_vqa"):
        images.append(entry)
        for pair in item["qa"]:
            question, answer, *rest = pair
            question_id = len(questions)
            questions.append({"image_id": entry["id"], "question": question, "question_id": question_id})
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": entry["id"],
                    "question_type": rest[0] if rest else "other",
                    "answer_type": _answer_type(answer),
                    "multiple_choice_answer": answer,
                    "answers": [
                        {"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                        for k in range(_VQA_ANSWERS_PER_QUESTION)
                    ],
                }
            )
    info = {"description": "exported by mmkit.data.export_vqa"}
    q_path, a_path = folder / "questions.json", folder / "annotations.json"
    header = {"info": info, "task_type": "Open-Ended", "data_type": "mmkit"}
    atomic_write_text(q_path, json.dumps({**header, "images": images, "questions": questions}))
    atomic_write_text(a_path, json.dumps({**header, "annotations": annotations}))
    return q_path, a_path


# --------------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path, owner: str, expected: str) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{owner}: file not found: {path} (expected {expected})") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{owner}: {path} is a directory; expected a file with {expected}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{owner}: {path} is not valid JSON ({err}); expected {expected}") from None


def _require(ok: bool, owner: str, path: Path, expected: str, got: Any) -> None:
    if not ok:
        shown = repr(got)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise ValueError(f"{owner}: malformed {path}: expected {expected}, got {shown}")


def _open_rgb(path: Path, owner: str, source: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{owner}: image not found: {path} (named in {source}; check image_root)"
        ) from None


_COCO_EXPECTED = "a COCO captions JSON object with 'images' and 'annotations' lists"


class CocoCaptions(Dataset):
    """Images with captions from a COCO-captions JSON (e.g. ``captions_val2014.json`` or our export).

    Items: ``{"id": file stem, "image_id": int, "image": PIL RGB, "caption": first caption,
    "captions": all captions in file order}``. Images without captions are skipped.
    """

    def __init__(self, captions_json: str | os.PathLike, image_root: str | os.PathLike) -> None:
        self.captions_json = Path(captions_json)
        self.image_root = Path(image_root)
        self._records: list[tuple[int, str, list[str]]] | None = None

    def load(self) -> CocoCaptions:
        """Read and check the JSON now (otherwise done on first use); returns ``self``."""
        if self._records is None:
            self._records = self._parse()
        return self

    def _parse(self) -> list[tuple[int, str, list[str]]]:
        path, owner = self.captions_json, "CocoCaptions"
        data = _read_json(path, owner, _COCO_EXPECTED)
        ok = (
            isinstance(data, dict)
            and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)
        )
        _require(ok, owner, path, _COCO_EXPECTED, sorted(data) if isinstance(data, dict) else data)
        files: dict[int, str] = {}
        for k, entry in enumerate(data["images"]):
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("id"), int)
                and isinstance(entry.get("file_name"), str)
            )
            _require(ok, owner, path, f"images[{k}] to have an int 'id' and a str 'file_name'", entry)
            _require(
                entry["id"] not in files, owner, path, f"unique image ids; images[{k}] repeats", entry["id"]
            )
            files[entry["id"]] = entry["file_name"]
        texts: dict[int, list[str]] = {image_id: [] for image_id in files}
        for k, ann in enumerate(data["annotations"]):
            ok = (
                isinstance(ann, dict)
                and isinstance(ann.get("image_id"), int)
                and isinstance(ann.get("caption"), str)
            )
            _require(ok, owner, path, f"annotations[{k}] to have an int 'image_id' and a str 'caption'", ann)
            _require(
                ann["image_id"] in texts, owner, path, f"annotations[{k}].image_id to be in 'images'", ann
            )
            texts[ann["image_id"]].append(ann["caption"])
        return [(image_id, files[image_id], caps) for image_id, caps in texts.items() if caps]

    def __len__(self) -> int:
        return len(self.load()._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id, file_name, caps = self.load()._records[index]
        return {
            "id": Path(file_name).stem,
            "image_id": image_id,
            "image": _open_rgb(self.image_root / file_name, "CocoCaptions", self.captions_json),
            "caption": caps[0],
            "captions": list(caps),
        }

    def __repr__(self) -> str:
        return f"CocoCaptions({str(self.captions_json)!r}, {str(self.image_root)!r})"


_Q_EXPECTED = "a VQA questions JSON object with a 'questions' list"
_A_EXPECTED = "a VQA annotations JSON object with an 'annotations' list"


class VQADataset(Dataset):
    """Questions (and, when ``annotations_json`` is given, answers) in VQAv2 format; one item per question.

    Items: ``{"id": str(question_id), "question_id", "image_id", "image": PIL RGB, "question"}`` plus, with
    annotations, ``"answer"`` (multiple_choice_answer), ``"answers"`` (all human answers),
    ``"question_type"`` and ``"answer_type"``.

    ``image_file`` maps an image id to a file under ``image_root``: a format string such as
    ``"COCO_val2014_{image_id:012d}.jpg"`` (real VQAv2) or a callable; ``None`` uses the ``images`` list
    that :func:`export_vqa` writes into ``questions.json``.
    """

    def __init__(
        self,
        questions_json: str | os.PathLike,
        annotations_json: str | os.PathLike | None,
        image_root: str | os.PathLike,
        image_file: str | Callable[[int], str] | None = None,
    ) -> None:
        self.questions_json = Path(questions_json)
        self.annotations_json = Path(annotations_json) if annotations_json is not None else None
        self.image_root = Path(image_root)
        self.image_file = image_file
        self._records: list[dict[str, Any]] | None = None

    def load(self) -> VQADataset:
        """Read and check the JSON files now (otherwise done on first use); returns ``self``."""
        if self._records is None:
            self._records = self._parse()
        return self

    def _file_namer(self, data: dict) -> Callable[[int], str]:
        path, owner = self.questions_json, "VQADataset"
        if callable(self.image_file):
            return self.image_file
        if isinstance(self.image_file, str):
            pattern = self.image_file
            return lambda image_id: pattern.format(image_id=image_id)
        images = data.get("images")
        if not isinstance(images, list):
            raise ValueError(
                f"{owner}: {path} has no 'images' list to find image files by id; pass image_file, e.g. "
                "image_file='COCO_val2014_{image_id:012d}.jpg' for VQAv2 on COCO val2014"
            )
        files: dict[int, str] = {}
        for k, entry in enumerate(images):
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("id"), int)
                and isinstance(entry.get("file_name"), str)
            )
            _require(ok, owner, path, f"images[{k}] to have an int 'id' and a str 'file_name'", entry)
            files[entry["id"]] = entry["file_name"]

        def name(image_id: int) -> str:
            if image_id not in files:
                raise ValueError(f"{owner}: image_id {image_id} is not in the 'images' list of {path}")
            return files[image_id]

        return name

    def _parse(self) -> list[dict[str, Any]]:
        path, owner = self.questions_json, "VQADataset"
        data = _read_json(path, owner, _Q_EXPECTED)
        _require(
            isinstance(data, dict) and isinstance(data.get("questions"), list),
            owner,
            path,
            _Q_EXPECTED,
            sorted(data) if isinstance(data, dict) else data,
        )
        name = self._file_namer(data)
        answers = self._parse_annotations() if self.annotations_json is not None else None
        records = []
        for k, q in enumerate(data["questions"]):
            ok = (
                isinstance(q, dict)
                and isinstance(q.get("question_id"), int)
                and isinstance(q.get("image_id"), int)
                and isinstance(q.get("question"), str)
            )
            _require(
                ok,
                owner,
                path,
                f"questions[{k}] to have int 'question_id', int 'image_id', str 'question'",
                q,
            )
            record = {
                "question_id": q["question_id"],
                "image_id": q["image_id"],
                "question": q["question"],
                "file_name": name(q["image_id"]),
            }
            if answers is not None:
                if q["question_id"] not in answers:
                    raise ValueError(
                        f"{owner}: question_id {q['question_id']} from {path} has no entry in "
                        f"{self.annotations_json}; pass annotations_json=None for questions without answers"
                    )
                record["annotation"] = answers[q["question_id"]]
            records.append(record)
        return records

    def _parse_annotations(self) -> dict[int, dict[str, Any]]:
        path, owner = self.annotations_json, "VQADataset"
        data = _read_json(path, owner, _A_EXPECTED)
        _require(
            isinstance(data, dict) and isinstance(data.get("annotations"), list),
            owner,
            path,
            _A_EXPECTED,
            sorted(data) if isinstance(data, dict) else data,
        )
        out = {}
        for k, ann in enumerate(data["annotations"]):
            ok = (
                isinstance(ann, dict)
                and isinstance(ann.get("question_id"), int)
                and isinstance(ann.get("multiple_choice_answer"), str)
                and isinstance(ann.get("answers"), list)
                and all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in ann["answers"])
            )
            expected = (
                f"annotations[{k}] to have int 'question_id', str 'multiple_choice_answer' and "
                "'answers' as a list of {'answer': str, ...}"
            )
            _require(ok, owner, path, expected, ann)
            out[ann["question_id"]] = ann
        return out

    def __len__(self) -> int:
        return len(self.load()._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.load()._records[index]
        item = {
            "id": str(record["question_id"]),
            "question_id": record["question_id"],
            "image_id": record["image_id"],
            "image": _open_rgb(self.image_root / record["file_name"], "VQADataset", self.questions_json),
            "question": record["question"],
        }
        ann = record.get("annotation")
        if ann is not None:
            item["answer"] = ann["multiple_choice_answer"]
            item["answers"] = [a["answer"] for a in ann["answers"]]
            item["question_type"] = ann.get("question_type", "")
            item["answer_type"] = ann.get("answer_type", "")
        return item

    def __repr__(self) -> str:
        return f"VQADataset({str(self.questions_json)!r}, {str(self.annotations_json)!r}, {str(self.image_root)!r})"
