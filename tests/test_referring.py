"""Referring-segmentation sources: ShapesWorld expressions with exact masks, a RefCOCO-style JSON, and COCO
mask decoding (polygons, uncompressed and compressed RLE)."""

import json

import numpy as np
import pytest
from PIL import Image

from mmkit.data.masks import _rle_string_counts, decode_segmentation
from mmkit.data.sources import DataConfig, ReferringSource, open_source


def rle_encode_string(counts: list[int]) -> str:
    """COCO's compressed RLE writer, written from its description, to test the reader against."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = not ((c & 0x10) == 0 and x == 0 or (c & 0x10) != 0 and x == -1)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_shapesworld_refer_gives_unique_expressions_and_exact_masks():
    source = open_source(DataConfig(source="shapesworld_refer", split="val", size=6, options={"render_size": 64}))
    assert isinstance(source, ReferringSource)
    kinds = set()
    for i in range(len(source)):
        refs = source.referrals(i)
        assert refs
        masks = [source.mask(i, r, 64) for r in refs]
        for r, m in zip(refs, masks, strict=True):
            assert m.shape == (64, 64) and m.dtype == bool and m.any() and r.index == i
            kinds.add(r.kind)
        for r in refs:
            if r.kind == "relation":
                assert " the " in r.expression
    assert kinds == {"attribute", "relation"}
    drawn = source.segmentation_examples(per_image=2, seed=3)
    assert drawn == source.segmentation_examples(per_image=2, seed=3)
    assert 0 < len(drawn) <= 12


def test_rle_string_round_trip_and_mask_layout():
    counts = [3, 5, 1, 0, 7, 2, 30, 1]
    assert _rle_string_counts(rle_encode_string(counts)) == counts
    mask = np.zeros((4, 3), dtype=bool)
    mask[1:3, 0] = True
    mask[0, 2] = True
    flat = mask.T.flatten()  # column-major, as COCO runs
    runs, value, n = [], False, 0
    for v in flat:
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(decode_segmentation({"counts": runs, "size": [4, 3]}, 4, 3), mask)
    assert np.array_equal(decode_segmentation({"counts": rle_encode_string(runs), "size": [4, 3]}, 4, 3), mask)
    with pytest.raises(ValueError, match="RLE covers"):
        decode_segmentation({"counts": [1, 2], "size": [4, 3]}, 4, 3)
    with pytest.raises(ValueError, match="polygons"):
        decode_segmentation("nope", 4, 3)


def test_polygons_fill_the_region():
    m = decode_segmentation([[2, 2, 7, 2, 7, 5, 2, 5]], 8, 10)
    assert m.shape == (8, 10) and m[3, 4] and not m[0, 0] and not m[7, 9]


def test_refcoco_json_source(tmp_path):
    Image.new("RGB", (10, 8), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (10, 8), (10, 200, 10)).save(tmp_path / "b.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 10},
                   {"id": 2, "file_name": "b.png", "height": 8, "width": 10}],
        "annotations": [{"id": 7, "image_id": 1, "segmentation": [[2, 2, 7, 2, 7, 5, 2, 5]]},
                        {"id": 8, "image_id": 2, "segmentation": {"counts": [0, 80], "size": [8, 10]}}],
        "refs": [{"ann_id": 7, "image_id": 1, "split": "val", "sentences": [{"sent": "the box"}, {"sent": "red"}]},
                 {"ann_id": 8, "image_id": 2, "split": "train", "sentences": ["everything"]}],
    }
    (tmp_path / "refs.json").write_text(json.dumps(data))
    options = {"refs": str(tmp_path / "refs.json"), "images": str(tmp_path)}
    val = open_source(DataConfig(source="refcoco", split="val", size=10, options=options))
    assert len(val) == 1 and val.item_id(0) == "1"
    refs = val.referrals(0)
    assert [r.expression for r in refs] == ["the box", "red"] and {r.target for r in refs} == {7}
    assert val.mask(0, refs[0], (8, 10))[3, 4] and val.mask(0, refs[0], 4).shape == (4, 4)
    assert val.image(0).size == (10, 8)
    train = open_source(DataConfig(source="refcoco", split="train", size=10, options=options))
    assert train.mask(0, train.referrals(0)[0], (8, 10)).all()
    with pytest.raises(ValueError, match="needs data.options.images"):
        open_source(DataConfig(source="refcoco", options={"refs": str(tmp_path / "refs.json")}))
    bad = dict(data, images=[{"id": 1, "file_name": "a.png"}])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"images\[0\] lacks \['height', 'width'\]"):
        open_source(DataConfig(source="refcoco", options={"refs": str(tmp_path / "bad.json"), "images": "x"}))
    bad = dict(data, annotations=[dict(data["annotations"][0], image_id=5)])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="image_id 5, which is not in images"):
        open_source(DataConfig(source="refcoco", options={"refs": str(tmp_path / "bad.json"), "images": "x"}))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="needs a list under 'images'"):
        open_source(DataConfig(source="refcoco", options={"refs": str(tmp_path / "bad.json"), "images": "x"}))


def test_command_line_source_options_read_for_their_type():
    from mmkit.data.sources import parse_source_options

    got = parse_source_options(["lifetime=null", "max_objects=3", "offset=-1", "duration=2.0", "refs=a/b.json"])
    assert got == {"lifetime": None, "max_objects": 3, "offset": -1, "duration": 2.0, "refs": "a/b.json"}
    # knowing the source: text stays text (YAML would cut " #..." as a comment, or read "yes" / "1e5" / a date),
    # whole numbers are base 10 (YAML 1.1 reads 010 as octal 8), the rest as YAML
    typed = parse_source_options(["images=/data/set #2", "refs=1e5"], "refcoco")
    assert typed == {"images": "/data/set #2", "refs": "1e5"}
    assert parse_source_options(["max_objects=010", "render_size=64"], "shapesworld_refer") == \
        {"max_objects": 10, "render_size": 64}
    clips = parse_source_options(["lifetime=null", "audio=false", "fps=2.5", "max_objects=010"], "shapesworld_clips")
    assert clips == {"lifetime": None, "audio": False, "fps": 2.5, "max_objects": 10}
    with pytest.raises(ValueError, match="must look like KEY=VALUE"):
        parse_source_options(["lifetime"])
