"""Recipe glue: strict configs with overrides, atomic checkpoints, a tiny end-to-end train + resume + eval."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkit.training import apply_overrides, latest_checkpoint, list_checkpoints, load_config, save_checkpoint
from mmkit.training.checkpoint import load_training_state
from mmkit.training.vlm import VLMTrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  connector: linear\ntrain:\n  batch_size: 4\n")
    cfg = load_config(VLMTrainConfig, path, ["train.learning_rate=1e-4", "data.tasks={caption: 2}", "model.token_grid=null"])
    assert cfg.model.connector == "linear" and cfg.train.batch_size == 4
    assert cfg.train.learning_rate == 1e-4 and cfg.data.tasks == {"caption": 2} and cfg.model.token_grid is None
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        load_config(VLMTrainConfig, path, ["train.learnig_rate=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides({}, ["oops"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(VLMTrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="unknown data.source 'laion'"):
        load_config(VLMTrainConfig, None, ["data.source=laion"])
    with pytest.raises(ValueError, match="unknown key 'render_sise'; did you mean 'render_size'"):
        load_config(VLMTrainConfig, None, ["data.options.render_sise=30"])
    with pytest.raises(ValueError, match="unknown key 'render_size'.*captions, images"):  # options are per source
        load_config(VLMTrainConfig, None, ["data.source=coco", "data.options.render_size=30"])


def test_every_registered_data_source_follows_the_protocol(tmp_path):
    """Each source: ids, images, texts and examples line up; file sources read the formats ShapesWorld exports."""
    from mmkit.data import ShapesWorld, ShapesWorldConfig, export_coco_captions, export_refcoco, export_vqa
    from mmkit.data.sources import SOURCES, DataConfig, ReferringSource, open_source

    world = ShapesWorld(ShapesWorldConfig(image_size=32), split="val", size=3)
    coco, vqa = export_coco_captions(world, tmp_path / "coco"), export_vqa(world, tmp_path / "vqa")
    refs = export_refcoco(world, tmp_path / "refcoco")
    options = {
        "shapesworld": {"render_size": 32},
        "shapesworld_clips": {"render_size": 32, "duration": 2.0, "lifetime": 1.0},
        "coco": {"captions": str(coco), "images": str(coco.parent / "images")},
        "vqa": {"questions": str(vqa[0]), "annotations": str(vqa[1]), "images": str(vqa[0].parent / "images")},
        "shapesworld_refer": {"render_size": 32},
        "refcoco": {"refs": str(refs), "images": str(refs.parent / "images")},
    }
    assert set(options) == set(SOURCES.names()), "a new source needs a case here"
    for name in SOURCES.names():
        source = open_source(DataConfig(source=name, split="val", size=3, options=options[name],
                                        tasks={"caption": 1, "vqa": 1}))
        assert len(source) == 3 and len(set(source.ids())) == 3
        item = source.image(0)  # an image, or a clip of frames
        assert (item.frames[0] if hasattr(item, "frames") else item).size[0] > 0
        examples = source.examples(caption_prompt="<image>Caption:", vqa_prompt="<image>Q: {question} A:")
        assert examples or isinstance(source, ReferringSource)  # a RefCOCO file has no captions
        assert all(0 <= ex.index < 3 and ex.target for ex in examples)
        if isinstance(source, ReferringSource):
            for i in range(3):
                refs_i = source.referrals(i)
                assert refs_i and all(source.mask(i, r, 32).any() for r in refs_i)
        assert source.signature()["source"] == name
    # the RefCOCO export holds exactly ShapesWorld's expressions and masks
    sw = open_source(DataConfig(source="shapesworld_refer", split="val", size=3, options={"render_size": 32}))
    rc = open_source(DataConfig(source="refcoco", split="val", size=3, options=options["refcoco"]))
    for i in range(3):
        a = sorted((r.expression, sw.mask(i, r, 32).tobytes()) for r in sw.referrals(i))
        b = sorted((r.expression, rc.mask(i, r, 32).tobytes()) for r in rc.referrals(i))
        assert a == b
    with pytest.raises(ValueError, match="needs data.options.captions, data.options.images"):
        open_source(DataConfig(source="coco", size=3))


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    opt.step()

    def write(folder):
        (folder / "adapter.txt").write_text("weights")

    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, write_adapter=write, optimizer=opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000020", "step-000030"]
    assert latest_checkpoint(tmp_path).name == "step-000030"

    def crash(folder):
        (folder / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 40, write_adapter=crash)
    assert latest_checkpoint(tmp_path).name == "step-000030"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".step")]  # no debris
    state = torch.load(tmp_path / "step-000030" / "optimizer.pt", weights_only=True)
    assert "state" in state


def run_recipe(script, args, cwd):
    res = subprocess.run([sys.executable, str(ROOT / "recipes" / script), *args], capture_output=True, text=True,
                         cwd=cwd, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def tiny_overrides(parts, out):
    return [
        f"model.encoder=hf:{parts / 'vision'}", f"model.llm={parts / 'llm'}", "model.token_grid=2",
        "model.caption_prompt=<image> caption :", "model.vqa_prompt=<image> {question} answer :",
        "data.size=12", "data.options.render_size=30", f"data.feature_cache={out / 'features'}",
        f"train.output_dir={out / 'run'}", "train.batch_size=4", "train.log_every=1", "train.save_every=2",
    ]


def test_tiny_caption_recipe_trains_resumes_and_evaluates(tiny_parts, tmp_path):
    args = tiny_overrides(tiny_parts, tmp_path)
    run_recipe("caption/train.py", ["--max_train_steps", "3", *args], tmp_path)
    run_dir = tmp_path / "run"
    assert (run_dir / "final" / "connector" / "adapter.safetensors").is_file()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000002", "step-000003"]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all("map_loss" in r for r in log)
    parts = json.loads((run_dir / "final" / "bundle.json").read_text())["parts"]
    assert parts["encoder"]["spec"].startswith("hf:") and parts["llm"]["name"].endswith("llm")
    # resume continues from step 3 to 5
    run_recipe("caption/train.py", ["--resume", "--max_train_steps", "5", *args], tmp_path)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    # resuming with other connector settings (same shapes, other maths) stops at once, naming the setting
    res = subprocess.run([sys.executable, str(ROOT / "recipes" / "caption/train.py"), "--resume", "--max_train_steps",
                          "6", *args, "model.connector_options.assignment=balanced"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert res.returncode != 0 and "assignment (saved 'prior_weighted', model 'balanced')" in res.stderr, res.stderr[-3000:]
    assert "step-000004" not in res.stderr  # not retried on an older checkpoint
    # eval on held-out scenes
    out = tmp_path / "eval.json"
    run_recipe("caption/eval.py", ["--connectors", str(run_dir / "final"), "--size", "4", "--render-size", "30",
                                   "--feature-cache", str(tmp_path / "features"), "--json", str(out)], tmp_path)
    res = json.loads(out.read_text())[0]
    assert {"CIDEr", "BLEU-4", "attribute_accuracy"} <= set(res["caption"])
    assert "overall" in res["vqa"] and "cosine" in res["retrieval"] and "assignment" in res["retrieval"]
    # assignment diagnostics of the trained connector
    diag = tmp_path / "diag.json"
    run_recipe("caption/diagnose.py", ["--config", str(ROOT / "recipes/caption/configs/shapes_vlap.yaml"),
                                       "--connector", str(run_dir / "final"), "--batches", "2", "--json", str(diag),
                                       *args], tmp_path)
    d = json.loads(diag.read_text())
    assert d["connector"] == str(run_dir / "final") and d["batch_size"] == 4 and 0 < d["map_gradient_consistency"] <= 1


def test_tiny_vqa_recipe_linear(tiny_parts, tmp_path):
    args = tiny_overrides(tiny_parts, tmp_path) + ["model.connector=linear", "model.connector_options={}",
                                                  "data.tasks={caption: 0, vqa: 2}"]
    run_recipe("vqa/train.py", ["--max_train_steps", "2", *args], tmp_path)
    assert (tmp_path / "run" / "final" / "connector" / "adapter.json").is_file()


def test_shipped_config_smoke_with_real_backbones(tmp_path):
    """recipes/caption/configs/shapes_vlap.yaml with the real frozen EfficientNet-Lite0 and SmolLM2, 2 steps."""
    run_recipe("caption/train.py", [
        "--max_train_steps", "2", "data.size=16", "train.batch_size=4", f"data.feature_cache={tmp_path / 'f'}",
        f"train.output_dir={tmp_path / 'run'}",
    ], tmp_path)
    meta = json.loads((tmp_path / "run" / "final" / "connector" / "adapter.json").read_text())
    assert meta["kind"] == "vlap" and meta["config"]["vision_dim"] == 1280 and meta["config"]["llm_dim"] == 576


def test_graceful_stop_saves_at_a_step_boundary_on_sigterm_and_restores_the_handler():
    import os
    import signal

    from mmkit.training.checkpoint import GracefulStop

    before = signal.getsignal(signal.SIGTERM)
    saved, said = [], []
    steps_done = 0
    with pytest.raises(SystemExit) as done:
        with GracefulStop(lambda: saved.append(steps_done), said.append, lambda: f"step {steps_done}") as stop:
            for _ in range(5):
                steps_done += 1
                if steps_done == 2:
                    os.kill(os.getpid(), signal.SIGTERM)  # only sets the flag: this step still finishes
                stop.check()
    assert done.value.code == 130
    assert saved == [2] and "saved step 2" in said[0] and "--resume" in said[0]
    assert signal.getsignal(signal.SIGTERM) is before


def test_graceful_stop_saves_on_ctrl_c_and_lets_other_errors_through_unsaved():
    from mmkit.training.checkpoint import GracefulStop

    saved = []
    with pytest.raises(SystemExit):
        with GracefulStop(lambda: saved.append("ctrl-c"), lambda _: None, lambda: "x"):
            raise KeyboardInterrupt
    with pytest.raises(ValueError, match="bad batch"):
        with GracefulStop(lambda: saved.append("error"), lambda _: None, lambda: "x") as stop:
            stop.check()  # no signal: nothing happens
            raise ValueError("bad batch")
    assert saved == ["ctrl-c"]


def test_checkpoints_carry_the_random_stream(tmp_path):
    """Dropout (e.g. LoRA's) draws from torch's generator: a resumed run must draw what the unbroken one drew."""
    torch.manual_seed(5)
    torch.rand(3)
    folder = save_checkpoint(tmp_path, 1, write_adapter=lambda f: None)
    unbroken = torch.rand(4)
    torch.manual_seed(99)  # a fresh process would start elsewhere
    load_training_state(folder)
    assert torch.equal(torch.rand(4), unbroken)
    assert (folder / "rng.safetensors").is_file()


def test_the_feature_cache_resumes_from_the_batches_kept_before_a_stop(tmp_path):
    """A cache build stopped part way (here: the loader fails on item 7) keeps its finished batches; the next
    build encodes only the rest, gives the same features as one uninterrupted build, and removes the kept
    batches once the cache file is written. Kept batches of another signature are not reused."""
    from types import SimpleNamespace

    from mmkit.data.features import cached_features

    class Counting:
        def __init__(self):
            self.seen = []

        def encode(self, images):
            self.seen += images
            return SimpleNamespace(tokens=torch.stack([torch.full((2, 3), i / 3) for i in images]))

    ids = [f"item-{i}" for i in range(10)]

    def failing(i):
        if i == 7:
            raise RuntimeError("stopped")
        return i

    path, whole = tmp_path / "cache.safetensors", tmp_path / "whole.safetensors"
    first = Counting()
    with pytest.raises(RuntimeError, match="stopped"):
        cached_features(path, encoder=first, ids=ids, load=failing, signature={"v": 1}, batch_size=3)
    assert first.seen == list(range(6)) and not path.exists()
    assert sorted(p.name for p in (tmp_path / "cache.safetensors.partial").iterdir()) == [
        "00000000-00000003.safetensors", "00000003-00000006.safetensors"]
    second = Counting()
    resumed = cached_features(path, encoder=second, ids=ids, load=lambda i: i, signature={"v": 1}, batch_size=3)
    assert second.seen == [6, 7, 8, 9] and not (tmp_path / "cache.safetensors.partial").exists()
    plain = cached_features(whole, encoder=Counting(), ids=ids, load=lambda i: i, signature={"v": 1}, batch_size=3)
    assert torch.equal(resumed, plain) and resumed.dtype == torch.float32 and resumed.shape == (10, 2, 3)
    # the first build returns what later runs load from the (fp16) file
    again = Counting()
    assert torch.equal(cached_features(path, encoder=again, ids=ids, load=lambda i: i, signature={"v": 1},
                                       batch_size=3), resumed) and again.seen == []
    assert not torch.equal(resumed, torch.stack([torch.full((2, 3), i / 3) for i in range(10)]))  # fp16-rounded
    # kept batches from another signature are encoded again
    with pytest.raises(RuntimeError, match="stopped"):
        cached_features(tmp_path / "other.safetensors", encoder=Counting(), ids=ids, load=failing, signature={"v": 1},
                        batch_size=3)
    third = Counting()
    cached_features(tmp_path / "other.safetensors", encoder=third, ids=ids, load=lambda i: i, signature={"v": 2},
                    batch_size=3)
    assert third.seen == list(range(10))
    # kept batches left behind by a build stopped right after writing the cache go on the next read
    (tmp_path / "cache.safetensors.partial").mkdir()
    cached_features(path, encoder=Counting(), ids=ids, load=lambda i: i, signature={"v": 1}, batch_size=3)
    assert not (tmp_path / "cache.safetensors.partial").exists()
