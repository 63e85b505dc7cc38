"""ShapesWorld: determinism, layout guarantees, masks vs pixels, motion, and the language checked against
an independent reading of the scene."""

import itertools
import math
import random
import re

import numpy as np
import pytest

from mmkit.data import (
    COLOURS,
    QA,
    SPLIT_SEED_RANGES,
    Ref,
    Scene,
    SceneObject,
    ShapesWorld,
    ShapesWorldConfig,
    attribute_hits,
    caption,
    captions,
    qa_pairs,
    referring_expressions,
    render_masks,
    render_scene,
    sample_scene,
    tokenize,
    vocabulary,
)

CFG = ShapesWorldConfig()
WORDS = ["zero", "one", "two", "three", "four", "five"]
RELATION_WORDS = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}


def obj(shape="circle", colour="red", size="small", x=0.5, y=0.5, **kw):
    diameter = dict(zip(CFG.sizes, CFG.size_fractions))[size]
    return SceneObject(shape=shape, colour=colour, size=size, diameter=diameter, x=x, y=y, **kw)


# ---------------------------------------------------------------------------------------------- config


def test_config_is_strict_and_validated():
    with pytest.raises(ValueError, match="unknown key 'colors'; did you mean 'colours'"):
        ShapesWorldConfig.from_dict({"colors": ["red"]})
    with pytest.raises(ValueError, match=r"shapes.*'heart'.*accepted|unknown: \['heart'\]"):
        ShapesWorldConfig(shapes=("circle", "heart"))
    with pytest.raises(ValueError, match="min_objects"):
        ShapesWorldConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="size_fractions"):
        ShapesWorldConfig(sizes=("small",), size_fractions=(0.2, 0.3))
    cfg = ShapesWorldConfig.from_dict({"colours": ["red", "blue"], "max_objects": 2})
    assert cfg.colours == ("red", "blue")


# ---------------------------------------------------------------------------------------------- sampling


def test_same_seed_same_scene_image_and_text():
    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    a, b = sample_scene(123, CFG), sample_scene(123, CFG)
    assert a == b and a.seed == 123
    assert render_scene(a, 64).tobytes() == render_scene(b, 64).tobytes()
    assert captions(a) == captions(b) and qa_pairs(a, CFG) == qa_pairs(b, CFG)
    assert referring_expressions(a) == referring_expressions(b)
    assert random.getstate() == py_state and (np.random.get_state()[1] == np_state).all()  # no global RNG
    scenes = {sample_scene(s, CFG) for s in range(50)}
    assert len(scenes) == 50


def test_split_seed_ranges_are_disjoint():
    ranges = sorted(SPLIT_SEED_RANGES.values())
    assert all(hi <= lo2 for (_, hi), (lo2, _) in itertools.pairwise(ranges))
    for split, (lo, hi) in SPLIT_SEED_RANGES.items():
        ds = ShapesWorld(CFG, split=split, size=hi - lo)
        assert ds.seed_of(0) == lo and ds.seed_of(len(ds) - 1) == hi - 1 and ds.seed_of(-1) == hi - 1
    train, val = ShapesWorld(CFG, "train", 5), ShapesWorld(CFG, "val", 5)
    assert {train.seed_of(i) for i in range(5)}.isdisjoint(val.seed_of(i) for i in range(5))
    with pytest.raises(IndexError, match="out of range"):
        train[5]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ShapesWorld(CFG, split="dev")
    with pytest.raises(ValueError, match="size must be"):
        ShapesWorld(CFG, size=10**7 + 1)


def _check_layout(scene, cfg):
    assert cfg.min_objects <= len(scene) <= cfg.max_objects
    for o in scene.objects:
        assert o.shape in cfg.shapes and o.colour in cfg.colours and o.size in cfg.sizes
        assert o.diameter == cfg.size_fractions[cfg.sizes.index(o.size)]
        for c in (o.x, o.y):
            assert cfg.margin + o.radius - 1e-12 <= c <= 1 - cfg.margin - o.radius + 1e-12
    for a, b in itertools.combinations(scene.objects, 2):
        assert math.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius + cfg.min_gap - 1e-12


def test_layout_margin_and_no_overlap():
    for seed in range(1500):
        _check_layout(sample_scene(seed, CFG), CFG)
    crowded = CFG.replace(min_objects=3, max_objects=3, sizes=("large",), size_fractions=(0.32,))
    for seed in range(200):
        _check_layout(sample_scene(seed, crowded), crowded)
    impossible = CFG.replace(min_objects=9, max_objects=9, sizes=("large",), size_fractions=(0.4,))
    with pytest.raises(RuntimeError, match="could not place 9 objects"):
        sample_scene(0, impossible)
    with pytest.raises(ValueError, match="non-negative int"):
        sample_scene(-1, CFG)


def test_objects_leave_background_around_them():
    # A later text-to-image model needs background: objects never cover most of the frame.
    for seed in range(100):
        masks = render_masks(sample_scene(seed, CFG), 64)
        assert masks.any(axis=0).mean() < 0.35


def test_texture_and_velocity_streams_leave_layout_unchanged():
    moving = CFG.replace(max_speed=0.1, texture_probability=0.5)
    for seed in range(30):
        a, b = sample_scene(seed, CFG), sample_scene(seed, moving)
        assert [(o.shape, o.colour, o.size, o.x, o.y) for o in a.objects] == [
            (o.shape, o.colour, o.size, o.x, o.y) for o in b.objects
        ]
        assert all(o.velocity == (0.0, 0.0) and o.texture == "plain" for o in a.objects)
        assert all(max(map(abs, o.velocity)) <= 0.1 for o in b.objects)
    assert any(o.texture != "plain" for s in range(30) for o in sample_scene(s, moving).objects)


# ---------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("size", [32, 64])
def test_masks_consistent_with_pixels(size):
    bg = np.array(CFG.background, dtype=int)
    for seed in range(40):
        scene = sample_scene(seed, CFG)
        image = np.asarray(render_scene(scene, size), dtype=int)  # (H, W, 3)
        masks = render_masks(scene, size)  # (N, H, W)
        assert image.shape == (size, size, 3) and masks.shape == (len(scene), size, size)
        assert masks.dtype == bool and masks.any(axis=(1, 2)).all()
        assert (masks.sum(axis=0) <= 1).all()  # disjoint
        for o, mask in zip(scene.objects, masks):
            # At least half of a mask pixel is the object's colour, so it is at least half-way there.
            distance = np.abs(np.array(COLOURS[o.colour]) - bg).sum()
            assert (np.abs(image[mask] - bg).sum(axis=-1) >= 0.45 * distance).all()
        # Pixels not touching any mask are exactly background.
        union = masks.any(axis=0)
        grown = union.copy()
        for dy, dx in itertools.product((-1, 0, 1), repeat=2):
            grown |= np.roll(np.roll(union, dy, axis=0), dx, axis=1)
        assert (image[~grown] == bg).all()


def test_mask_areas_follow_size():
    scene = Scene((obj("circle", size="small", x=0.3, y=0.3), obj("circle", "blue", "large", x=0.65, y=0.65)))
    for size in (64, 224):
        small, large = render_masks(scene, size).sum(axis=(1, 2))
        assert small < large
        expected = math.pi * (0.1 * size) ** 2
        assert abs(small - expected) / expected < 0.08
        assert abs(large / small - (0.32 / 0.2) ** 2) < 0.2
    assert render_scene(scene, 224).size == (224, 224)


def test_textures_and_noise_render_inside_objects_only():
    cfg = CFG.replace(texture_probability=1.0)
    scene = sample_scene(7, cfg)
    masks = render_masks(scene, 64)
    image = np.asarray(render_scene(scene, 64), dtype=int)
    plain = np.asarray(render_scene(sample_scene(7, CFG), 64), dtype=int)
    background = (plain == np.array(CFG.background)).all(axis=-1)
    assert all(o.texture in ("striped", "dotted") for o in scene.objects)
    assert (image != plain).any() and (image[background] == plain[background]).all()  # texture stays inside
    noisy_cfg = CFG.replace(background_noise=10.0)
    noisy = np.asarray(render_scene(sample_scene(7, noisy_cfg), 64), dtype=int)
    assert noisy.tobytes() == np.asarray(render_scene(sample_scene(7, noisy_cfg), 64)).astype(int).tobytes()
    assert noisy[background].std() > 3
    union = masks.any(axis=0)
    interior = union.copy()
    for dy, dx in itertools.product((-1, 0, 1), repeat=2):
        interior &= np.roll(np.roll(union, dy, axis=0), dx, axis=1)
    assert interior.any() and (noisy[interior] == plain[interior]).all()  # fully covered pixels: no noise


def test_velocity_moves_objects_linearly():
    still = obj("square", "green", "large", x=0.3, y=0.6)
    moving = obj("circle", "red", "small", x=0.3, y=0.3, velocity=(0.25, 0.1))
    scene = Scene((still, moving))
    assert scene.positions_at(2.0) == [(0.3, 0.6), (0.8, 0.5)]
    size = 64
    before, after = render_masks(scene, size), render_masks(scene, size, t=2.0)
    np.testing.assert_array_equal(before[0], after[0])

    def centroid(m):
        ys, xs = np.nonzero(m)
        return xs.mean(), ys.mean()

    (x0, y0), (x1, y1) = centroid(before[1]), centroid(after[1])
    assert abs((x1 - x0) - 0.5 * size) < 0.5 and abs((y1 - y0) - 0.2 * size) < 0.5
    assert render_scene(scene, size, t=2.0).tobytes() == render_scene(scene.at(2.0), size).tobytes()
    static = sample_scene(3, CFG)
    assert render_scene(static, size, t=5.0).tobytes() == render_scene(static, size).tobytes()
    off = Scene((obj(x=0.5, y=0.5, velocity=(10.0, 0.0)),))
    assert not render_masks(off, 32, t=1.0).any()  # left the frame: empty mask, no error


# ---------------------------------------------------------------------------------------------- captions


def test_caption_grammar_examples():
    one = Scene((obj("circle", "red", "small"),))
    assert caption(one) == "a small red circle"
    assert "a red circle" in captions(one) and "there is a small red circle" in captions(one)
    two = Scene(
        (obj("square", "blue", "large", x=0.75, y=0.45), obj("circle", "red", "small", x=0.25, y=0.5))
    )
    assert caption(two) == "a small red circle to the left of a large blue square"
    assert "a large blue square to the right of a small red circle" in captions(two)
    stacked = Scene(
        (obj("star", "orange", "small", x=0.5, y=0.8), obj("cross", "white", "large", x=0.45, y=0.3))
    )
    assert caption(stacked) == "a large white cross above a small orange star"
    assert "a white cross above an orange star" in captions(stacked)
    three = Scene(
        (
            obj("star", "green", x=0.8, y=0.2),
            obj("circle", "red", x=0.2, y=0.8),
            obj("square", "blue", "large", x=0.5, y=0.5),
        )
    )
    assert caption(three) == "a small red circle, a large blue square and a small green star"


def test_every_caption_variant_parses_back():
    for seed in range(200):
        scene = sample_scene(seed, CFG)
        n = len(scene)
        assert attribute_hits(caption(scene), scene) == (n, n)
        for text in captions(scene):
            assert attribute_hits(text, scene) == (n, n), text
        canonical = caption(scene)
        for o in scene.objects:  # canonical states size, colour and shape of each object
            assert f"{o.size} {o.colour} {o.shape}" in canonical


def test_wrong_colour_scores_lower():
    for seed in range(100):
        scene = sample_scene(seed, CFG)
        text, first = caption(scene), scene.objects[0]
        unused = next(c for c in CFG.colours if c not in {o.colour for o in scene.objects})
        wrong = text.replace(f"{first.colour} {first.shape}", f"{unused} {first.shape}", 1)
        hits, total = attribute_hits(wrong, scene)
        assert hits < total
    scene = Scene((obj("circle", "red", x=0.3), obj("circle", "red", x=0.7)))
    assert attribute_hits("a red circle", scene) == (1, 2)  # one phrase matches one object
    assert attribute_hits("a red circle and a small red circle", scene) == (2, 2)
    assert attribute_hits("red circles", scene) == (0, 2)
    assert attribute_hits("the circle is red", scene) == (0, 2)
    assert attribute_hits("A Red, Striped Circle!", scene) == (1, 2)


# ---------------------------------------------------------------------------------------------- QA


PLURALS = {(s + "es" if s.endswith("s") else s + "s"): s for s in CFG.shapes}


def _select(scene, phrase):
    """Objects matching every word of a noun phrase ('large red', 'small circle'); 'object' is a wildcard."""
    words = [w for w in phrase.split() if w != "object"]
    return [i for i, o in enumerate(scene.objects) if all(w in (o.size, o.colour, o.shape) for w in words)]


def _on_side(a, b, side):
    return {"left": a.x < b.x, "right": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[side]


def _dominates(a, b, side):
    dx, dy = abs(a.x - b.x), abs(a.y - b.y)
    return _on_side(a, b, side) and (dx >= dy if side in ("left", "right") else dy > dx)


def _oracle(scene, question):
    objs = scene.objects
    if question == "how many objects are there?":
        return WORDS[len(objs)]
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return WORDS[sum(o.shape == PLURALS[m[1]] for o in objs)]
    if m := re.fullmatch(r"what colour is the (.+)\?", question):
        (i,) = _select(scene, m[1])
        return objs[i].colour
    if m := re.fullmatch(r"what shape is the (.+)\?", question):
        (i,) = _select(scene, m[1])
        return objs[i].shape
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objs) else "no"
    rel = "|".join(RELATION_WORDS)
    if m := re.fullmatch(rf"is the (.+?) ({rel}) the (.+)\?", question):
        (a,) = _select(scene, m[1])
        (b,) = _select(scene, m[3])
        return "yes" if _dominates(objs[a], objs[b], RELATION_WORDS[m[2]]) else "no"
    if m := re.fullmatch(rf"what is ({rel}) the (.+)\?", question):
        (b,) = _select(scene, m[2])
        side = RELATION_WORDS[m[1]]
        (a,) = [k for k, o in enumerate(objs) if k != b and _on_side(o, objs[b], side)]
        assert _dominates(objs[a], objs[b], side)
        return f"{objs[a].colour} {objs[a].shape}"
    raise AssertionError(f"question outside the grammar: {question}")


def test_qa_answers_match_an_independent_reading():
    kinds = set()
    for seed in range(200):
        scene = sample_scene(seed, CFG)
        pairs = qa_pairs(scene, CFG)
        assert all(isinstance(p, QA) for p in pairs)
        assert len({p.question for p in pairs}) == len(pairs)
        for p in pairs:
            assert p.answer == _oracle(scene, p.question), (seed, p)
            kinds.add(p.kind)
        exists = [p.answer for p in pairs if p.kind == "exists"]
        assert exists.count("no") == exists.count("yes")  # balanced negatives
    assert kinds == {"colour", "shape", "count", "relation", "exists"}


def test_qa_examples_and_ambiguity():
    scene = Scene(
        (obj("circle", "red", x=0.25, y=0.5), obj("square", "blue", "large", x=0.75, y=0.5)), seed=0
    )
    pairs = {(p.question, p.answer, p.kind) for p in qa_pairs(scene, CFG)}
    assert ("what colour is the circle?", "red", "colour") in pairs
    assert ("what shape is the blue object?", "square", "shape") in pairs
    assert ("how many objects are there?", "two", "count") in pairs
    assert ("is the red circle to the left of the blue square?", "yes", "relation") in pairs
    assert ("is the blue square to the left of the red circle?", "no", "relation") in pairs
    assert ("what is to the left of the blue square?", "red circle", "relation") in pairs
    twins = Scene((obj("circle", "red", x=0.25), obj("circle", "red", x=0.75)), seed=0)
    questions = [p.question for p in qa_pairs(twins, CFG)]
    assert "what colour is the circle?" not in questions  # two circles: not asked
    assert not any(q.startswith(("is the ", "what is ")) for q in questions)
    assert qa_pairs(scene, CFG, seed=5) == qa_pairs(scene, CFG, seed=5)


# ---------------------------------------------------------------------------------------------- refs


def _resolve(scene, expression):
    """Indices of the objects an expression can denote, read independently of the generator."""
    rel = "|".join(RELATION_WORDS)
    if m := re.fullmatch(rf"the object ({rel}) the (.+)", expression):
        (b,) = _select(scene, m[2])
        side = RELATION_WORDS[m[1]]
        return [k for k, o in enumerate(scene.objects) if k != b and _on_side(o, scene.objects[b], side)]
    m = re.fullmatch(r"the (.+)", expression)
    return _select(scene, m[1])


def test_referring_expressions_are_unique():
    relational = 0
    for seed in range(200):
        scene = sample_scene(seed, CFG)
        refs = referring_expressions(scene)
        assert all(isinstance(r, Ref) for r in refs)
        assert len({r.expression for r in refs}) == len(refs)
        for r in refs:
            assert _resolve(scene, r.expression) == [r.object_index], (seed, r)
            relational += r.expression.startswith("the object ")
        masks = render_masks(scene, 32)
        assert all(masks[r.object_index].any() for r in refs)
    assert relational > 50
    twins = Scene(
        (obj("circle", "red", x=0.25), obj("circle", "red", x=0.75), obj("star", "blue", x=0.5, y=0.2))
    )
    exprs = {r.expression: r.object_index for r in referring_expressions(twins)}
    assert "the red circle" not in exprs and exprs["the star"] == 2


def test_vocabulary_covers_all_text():
    cfg = CFG.replace(texture_probability=0.5)
    vocab = set(vocabulary(cfg))
    for seed in range(200):
        scene = sample_scene(seed, cfg)
        texts = captions(scene) + [r.expression for r in referring_expressions(scene)]
        texts += [t for p in qa_pairs(scene, cfg) for t in (p.question, p.answer)]
        for text in texts:
            assert set(tokenize(text)) <= vocab, text
    assert "striped" not in vocabulary(CFG) and "crosses" in vocab


# ---------------------------------------------------------------------------------------------- dataset


def test_dataset_items():
    ds = ShapesWorld(CFG.replace(image_size=32), split="val", size=4)
    item = ds[2]
    assert set(item) == {"id", "seed", "image", "caption", "captions", "qa", "refs", "scene"}
    assert item["id"] == "val-000002" and item["seed"] == SPLIT_SEED_RANGES["val"][0] + 2
    assert item["image"].mode == "RGB" and item["image"].size == (32, 32)
    assert item["caption"] == item["captions"][0] == caption(item["scene"])
    assert item["scene"] == sample_scene(item["seed"], ds.cfg)
    again = ShapesWorld(CFG.replace(image_size=32), split="val", size=4)[2]
    assert again["image"].tobytes() == item["image"].tobytes() and again["qa"] == item["qa"]
    assert ds[-1]["id"] == "val-000003"


def test_two_large_objects_that_random_layouts_miss_are_placed_in_opposite_corners():
    from mmkit.training.t2i_adapters import two_object_world

    world = two_object_world()
    scene = sample_scene(26336, world)  # every random layout of its two large objects failed (a WiCLP run crashed)
    a, b = scene.objects
    assert a.diameter == b.diameter == max(world.size_fractions)
    assert math.hypot(a.x - b.x, a.y - b.y) >= a.diameter / 2 + b.diameter / 2 + world.min_gap
    for o in scene.objects:
        assert world.margin + o.diameter / 2 - 1e-9 <= min(o.x, o.y) and max(o.x, o.y) <= 1 - world.margin - o.diameter / 2 + 1e-9
