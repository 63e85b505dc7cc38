"""``mmkit demo``: the main job on this machine, end to end, in about a minute.

Loads the real frozen backbones (EfficientNet-Lite0 ImageNet weights, SmolLM2-135M-Instruct) and the VLAP
connector our caption recipe trained (shipped in ``assets/connectors/shapes-vlap``), captions held-out
ShapesWorld scenes and a few real photos from scikit-image, answers questions about them, and writes an
HTML page with the pictures and the outputs.
``mmkit demo --core`` shows the attention core instead (backends vs oracle, fused vs naive, agents, ToMe).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import time
from pathlib import Path

from ..assets import DEFAULT_CONNECTOR
from .base import Command, positive_int

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
PHOTO_QUESTIONS = ("what colour is the object?", "how many objects are there?")


def _median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_core_showcase() -> None:
    import torch

    from ..ops import attention, backends, block_causal, key_padding
    from ..ops.agent import agent_attention
    from ..ops.tome import bipartite_soft_matching_2d

    torch.manual_seed(0)
    print("1) every available backend vs the eager float64 oracle (B2 Lq7 Lk9 H4 Hkv2 D24, padding + frames):")
    q, k, v = torch.randn(2, 7, 4, 24), torch.randn(2, 9, 2, 24), torch.randn(2, 9, 2, 24)
    mask = key_padding(torch.tensor([9, 5]), 9) & block_causal((2, 3))
    ref = attention(q.double(), k.double(), v.double(), mask=mask, backend="eager")
    for name, be in backends().items():
        why = be.unavailable()
        if why or name == "compiled":  # compiled takes ~30 s to build; the benchmark measures it
            print(f"   {name:<9} skipped: {why or 'compiles for ~30 s; see benchmarks/attention.py'}")
            continue
        err = (attention(q, k, v, mask=mask, backend=name).double() - ref).abs().max().item()
        print(f"   {name:<9} max |error| = {err:.1e}")
    print("2) SD-sized self-attention (B2 H8 N4096 d40), fused SDPA vs naive matmul-softmax-matmul:")
    q, k, v = (torch.randn(2, 4096, 8, 40) for _ in range(3))
    t_eager = _median_time(lambda: attention(q, k, v, backend="eager"), 2)
    t_sdpa = _median_time(lambda: attention(q, k, v, backend="sdpa"), 2)
    print(f"   eager {t_eager * 1e3:.0f} ms, sdpa {t_sdpa * 1e3:.0f} ms -> {t_eager / t_sdpa:.1f}x faster")
    print("3) agent attention (49 agents from the 64x64 query grid) vs full attention at N=4096:")
    t_agent = _median_time(lambda: agent_attention(q, k, v, num_agents=49, grid=(64, 64), shortcut=0.075), 5)
    print(f"   agent {t_agent * 1e3:.0f} ms vs full {t_sdpa * 1e3:.0f} ms -> {t_sdpa / t_agent:.1f}x faster")
    print("4) token merging (ToMe, 2x2 cells, r = 40% of 4096 tokens):")
    x = torch.randn(2, 4096, 320)
    tm = bipartite_soft_matching_2d(x, 64, 64, r=int(0.4 * 4096), generator=torch.Generator().manual_seed(0))
    merged, sizes = tm.merge(x)
    mass_err = ((merged * sizes[..., None]).sum(1) - x.sum(1)).abs().max().item()
    print(f"   {x.shape[1]} -> {merged.shape[1]} tokens; token mass preserved to {mass_err:.1e}")


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_page(path: Path, sections: list[tuple[str, str, list[dict]]], header: str) -> Path:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>mmkit demo</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        ".card{display:inline-block;vertical-align:top;width:250px;margin:8px;padding:8px;border:1px solid #ccc;"
        "border-radius:6px}.card img{width:234px;height:234px;object-fit:contain;background:#222}"
        ".ok{color:#080}.bad{color:#b00}small{color:#666}</style>",
        f"<h1>mmkit demo</h1><p>{header}</p>",
    ]
    for title, note, cards in sections:
        parts.append(f"<h2>{html.escape(title)}</h2><p><small>{html.escape(note)}</small></p>")
        for c in cards:
            rows = [f"<img src='{c['img']}'>", f"<b>caption:</b> {html.escape(c['caption'])}"]
            if c.get("truth"):
                rows.append(f"<small>truth: {html.escape(c['truth'])}</small>")
            if c.get("label"):
                rows.append(f"<small>EfficientNet ImageNet top-1: {html.escape(c['label'])}</small>")
            for q in c.get("qa", []):
                cls = "" if q.get("gold") is None else ("ok" if q["correct"] else "bad")
                gold = "" if q.get("gold") is None else f" <small>(truth: {html.escape(q['gold'])})</small>"
                rows.append(f"Q: {html.escape(q['q'])}<br>A: <span class='{cls}'>{html.escape(q['a'])}</span>{gold}")
            parts.append("<div class='card'>" + "<br>".join(rows) + "</div>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def run_vlm_demo(connector: Path | None, out_dir: Path, num_scenes: int) -> Path:
    import torch
    from skimage import data as skdata

    from ..data.images import load_image
    from ..data.shapes import ShapesWorldConfig, render_scene
    from ..data.shapes_language import attribute_hits, caption, qa_pairs
    from ..data.shapesworld import ShapesWorld
    from ..eval.vqa import vqa_accuracy
    from ..models import VisionLanguageModel

    t0 = time.perf_counter()
    if connector is None:
        connector = DEFAULT_CONNECTOR
    model = VisionLanguageModel.from_pretrained(connector)
    meta = VisionLanguageModel.bundle_parts(connector)
    print(f"loaded encoder {model.encoder.spec} + {meta['llm']['name']} + {model.connector.kind} connector "
          f"from {connector} in {time.perf_counter() - t0:.1f} s")

    world = ShapesWorld(ShapesWorldConfig(image_size=224), split="test", size=num_scenes)
    scenes = [world.scene(i) for i in range(num_scenes)]
    images = [render_scene(s, 224) for s in scenes]
    feats = model.image_features(images)
    captions_pred = model.caption(features=feats)
    shape_cards, hits, total, qa_scores = [], 0, 0, []
    questions, owners, golds = [], [], []
    for i, scene in enumerate(scenes):
        for qa in qa_pairs(scene, seed=world.seed_of(i))[:2]:
            questions.append(qa.question)
            owners.append(i)
            golds.append(qa.answer)
    answers = model.answer(questions, features=feats[torch.tensor(owners)])
    for i, scene in enumerate(scenes):
        h, t = attribute_hits(captions_pred[i], scene)
        hits, total = hits + h, total + t
        qa = []
        for q, o, g, a in zip(questions, owners, golds, answers):
            if o == i:
                ok = vqa_accuracy(a, [g]) > 0
                qa_scores.append(ok)
                qa.append({"q": q, "a": a, "gold": g, "correct": ok})
        shape_cards.append({"img": _data_uri(images[i]), "caption": captions_pred[i], "truth": caption(scene), "qa": qa})
        print(f"  scene {world.seed_of(i)}: {captions_pred[i]!r}  (truth: {caption(scene)!r})")
    print(f"  attribute accuracy {hits}/{total}, answers correct {sum(qa_scores)}/{len(qa_scores)}")

    photos = [load_image(getattr(skdata, name)()) for name in PHOTOS]
    photo_feats = model.image_features(photos)
    photo_caps = model.caption(features=photo_feats)
    photo_answers = model.answer(
        [q for _ in photos for q in PHOTO_QUESTIONS], features=photo_feats.repeat_interleave(len(PHOTO_QUESTIONS), 0)
    )
    labels = _imagenet_labels(model.encoder, photos)
    photo_cards = []
    for j, name in enumerate(PHOTOS):
        qa = [{"q": q, "a": photo_answers[j * len(PHOTO_QUESTIONS) + n]} for n, q in enumerate(PHOTO_QUESTIONS)]
        photo_cards.append({"img": _data_uri(photos[j]), "caption": photo_caps[j], "label": labels[j], "qa": qa})
        print(f"  photo {name}: {photo_caps[j]!r}" + (f" (ImageNet: {labels[j]})" if labels[j] else ""))

    header = (f"Frozen {html.escape(model.encoder.spec)} -> trained {model.connector.kind} connector -> frozen "
              f"{html.escape(meta['llm']['name'])}. Connector: {html.escape(str(connector))}.")
    page = write_page(out_dir / "index.html", [
        ("Held-out ShapesWorld scenes (test split: seeds never seen in training)",
         f"attribute accuracy {hits}/{total}; answers correct {sum(qa_scores)}/{len(qa_scores)}", shape_cards),
        ("Real photos (scikit-image)", "The connector was trained on ShapesWorld only: it describes photos in "
         "the only vocabulary it learned. The encoder's own ImageNet label is shown for reference.", photo_cards),
    ], header)
    print(f"demo page: {page.resolve()}  ({time.perf_counter() - t0:.0f} s)")
    return page


def _imagenet_labels(encoder, photos) -> list[str]:
    classify = getattr(encoder, "classify", None)
    if classify is None:
        return ["" for _ in photos]
    import torch

    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        names = [info.index_to_description(i) for i in range(1000)]
    except (ImportError, AttributeError):
        names = None
    with torch.no_grad():
        top = classify(encoder.preprocess(photos)).argmax(-1).tolist()
    return [names[i] if names else f"class {i}" for i in top]


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--core", action="store_true", help="show the attention core instead of the VLM")
    parser.add_argument("--connector", type=Path, default=None, help=f"connector folder (default: {DEFAULT_CONNECTOR})")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="where the HTML page goes")
    parser.add_argument("--scenes", type=positive_int, default=8, help="held-out ShapesWorld scenes to show")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")


def _demo(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with torch.no_grad():  # inference only (a context, so callers' autograd state is left as it was)
        if args.core:
            run_core_showcase()
        else:
            run_vlm_demo(args.connector, args.out, args.scenes)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


COMMANDS = (Command("demo", "caption and question real and ShapesWorld images with the trained connector; HTML page",
                    _configure, _demo),)
