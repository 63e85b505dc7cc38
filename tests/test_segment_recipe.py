"""The segmentation recipe end to end at tiny scale: a tiny SAM folder, READ and <SEG>-only training with
resume, and the held-out evaluation with its overlay sheet."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmkit.testing import tiny_sam

ROOT = Path(__file__).resolve().parents[1]


def run(script, args, cwd):
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "segment" / script), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=900, env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                                                                 "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam") / "tiny-sam"
    tiny_sam(0).save_pretrained(path)
    return path


@pytest.mark.parametrize("sasp", ["{down_sample: 1, num_points: 8}", "null"])
def test_tiny_segment_recipe_trains_resumes_and_evaluates(sasp, tiny_parts, sam_dir, tmp_path, monkeypatch, capsys):
    args = [
        f"model.encoder=hf:{tiny_parts / 'vision'}", f"model.llm={tiny_parts / 'llm'}", "model.token_grid=3",
        f"model.sam={sam_dir}", f"model.seg={{prompt_dim: 20, lora_r: 2, sasp: {sasp}}}",
        "model.seg_prompt=<image> what is {expression} ?", "model.seg_answer=the <SEG> .",
        "data.size=4", "data.options={render_size: 30}", f"data.feature_cache={tmp_path / 'f'}",
        f"train.output_dir={tmp_path / 'run'}", "train.batch_size=2", "train.log_every=1", "train.save_every=1",
        "train.warmup_steps=1",
    ]
    run("train.py", ["--max_train_steps", "2", *args], tmp_path)
    run("train.py", ["--resume", "--max_train_steps", "3", *args], tmp_path)
    changed = [a.replace("lora_r: 2,", "lora_r: 2, dice_smooth: 0.5,") for a in args]  # the same run, other loss
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "segment" / "train.py"), "--resume",
                           "--max_train_steps", "4", *changed], capture_output=True, text=True, cwd=tmp_path,
                          timeout=900, env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                            "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "dice_smooth (saved 0.001, model 0.5)" in done.stderr, done.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all("dice_loss" in r and "ce_loss" in r for r in log)
    bundle = json.loads((tmp_path / "run" / "final" / "bundle.json").read_text())
    assert bundle["kind"] == "read" and bundle["parts"]["seg_prompt"] == "<image> what is {expression} ?"
    assert bundle["parts"]["seg_answer"] == "the <SEG> ."  # what probe_head.py teacher-forces
    assert Path(bundle["parts"]["sam"]["name"]).is_absolute()  # the bundle loads from any working directory
    out = tmp_path / "eval.json"
    done = run("eval.py", ["--models", str(tmp_path / "run" / "final"), "--size", "3", "--option", "render_size=30",
                           "--feature-cache", str(tmp_path / "f"), "--json", str(out), "--sheet",
                           str(tmp_path / "sheet.html"), "--sheet-examples", "2", "--ablate-points"], tmp_path)
    result = json.loads(out.read_text())[0]
    assert 0.0 <= result["gIoU"] <= 1.0 and result["examples"] >= 2 and result["sasp"] == (sasp != "null")
    if sasp == "null":
        assert result["sasp_points"] is None and "without_points" not in result  # no points to drop
    else:  # --ablate-points: the same expressions decoded without the points, paired with the full model
        bare = result["without_points"]
        assert 0.0 <= bare["gIoU"] <= 1.0 and bare["paired"]["examples"] == result["examples"]
        assert abs(bare["paired"]["mean_diff"] - (result["gIoU"] - bare["gIoU"])) < 1e-9
        assert "without its points" in done.stdout
    if sasp != "null" and result["no_mask"] < result["examples"]:  # some answer segments: the map's maximum is a positive point
        share = result["sasp_points"]["positives_inside_target"]
        assert result["sasp_points"]["positives_per_expression"] >= 1 and 0.0 <= share <= 1.0
    assert Path(result["sheet"]).is_file() and "data:image/png;base64" in Path(result["sheet"]).read_text()
    if result["similarity_auc"] is not None:  # any model: how well its <SEG> map ranks the target first
        assert 0.0 <= result["similarity_auc"] <= 1.0 and result["similarity_auc_expressions"] >= 1
    assert "| model | SasP | gIoU | cIoU |" in done.stdout
    ground = result["grounding"]  # held-out scenes 0 and 1 hold one object, scene 2 two: its expressions count
    assert ground["expressions"] >= 1 and 0.0 <= ground["named_best"] <= 1.0 and 1 / 3 <= ground["chance"] <= 0.5
    assert "overlaps the named object best" in done.stdout
    assert len(result["ious"]) == result["examples"] and abs(sum(result["ious"]) / len(result["ious"]) - result["gIoU"]) < 1e-9
    # does the mask follow the expression? (scene 2 holds two objects)
    diag = tmp_path / "diag.json"
    done = run("diagnose.py", ["--models", str(tmp_path / "run" / "final"), "--size", "3", "--json", str(diag)],
               tmp_path)
    (d,) = json.loads(diag.read_text())
    assert d["scenes"] == 1 and d["expressions"] == 2 and d["chance"] == 0.5 and d["named_best"] in (0.0, 0.5, 1.0)
    if d["no_mask"] == 0:  # both expressions answered with <SEG>: their masks were compared
        assert 0.0 <= d["mask_iou_between_expressions"] <= 1.0
    assert d["location_probe_r2_xy"] is None  # two expressions are too few to probe
    assert "named object best" in done.stdout
    # fresh heads on the frozen <SEG> states: every layer x input norm x seed is trained and scored
    probe = tmp_path / "probe.json"
    done = run("probe_head.py", ["--model", str(tmp_path / "run" / "final"), "--train-size", "3", "--size", "3",
                                 "--steps", "3", "--batch-size", "2", "--seeds", "0", "1", "--layers", "last", "1", "--option", "render_size=30", "--feature-cache",
                                 str(tmp_path / "f"), "--json", str(probe)], tmp_path)
    p = json.loads(probe.read_text())
    assert set(p["variants"]) == {f"layer {k}, input norm {n}" for k in ("last", "1") for n in ("none", "batch")}
    assert p["test_expressions"] == result["examples"]
    for v in p["variants"].values():
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        for r in v["runs"]:
            assert 0.0 <= r["gIoU"] <= 1.0 and r["grounding"]["expressions"] == ground["expressions"]
            assert len(r["grounding_hits"]) == p["test_expressions"] and len(r["losses"]) == 2
        assert abs(v["gIoU_mean"] - sum(r["gIoU"] for r in v["runs"]) / 2) < 1e-9
    assert "layer 1, input norm batch, seed 1: named object best" in done.stdout
    assert p["settings"]["answer"] == "the <SEG> ." and p["examples_sha"] == result["examples_sha"]
    refused = subprocess.run([sys.executable, str(ROOT / "recipes" / "segment" / "probe_head.py"), "--model",
                              str(tmp_path / "run" / "final"), "--split", "train"], capture_output=True, text=True)
    assert refused.returncode == 2 and "not the one they train on" in refused.stderr
    # pairing two reports of the same expressions: the difference of a model with itself is exactly zero
    paired = run("eval.py", ["--compare", str(out), str(out)], tmp_path)
    assert "minus" in paired.stdout and ": +0.0 points" in paired.stdout
    hits = result["grounding_hits"]  # per expression, None where the scene holds fewer than two objects
    assert len(hits) == result["examples"] and sum(h is not None for h in hits) == ground["expressions"]
    assert abs(sum(h for h in hits if h is not None) / ground["expressions"] - ground["named_best"]) < 1e-9
    flipped = dict(result, model="flipped", grounding_hits=[None if h is None else 1.0 - h for h in hits])
    older = {k: v for k, v in result.items() if k != "grounding_hits"}  # reports before 2026-12-01 lack them
    (tmp_path / "flipped.json").write_text(json.dumps([flipped]))
    (tmp_path / "older.json").write_text(json.dumps([older]))
    run("eval.py", ["--compare", str(out), str(tmp_path / "flipped.json"), str(tmp_path / "older.json"),
                    "--json", str(tmp_path / "pairs.json")], tmp_path)
    pairs = json.loads((tmp_path / "pairs.json").read_text())[0]["paired_vs_first"]
    expected = sum(1.0 - 2 * h for h in hits if h is not None) / ground["expressions"]
    assert abs(pairs[0]["grounding"]["mean_diff"] - expected) < 1e-9
    assert pairs[0]["grounding"]["examples"] == ground["expressions"] and "grounding" not in pairs[1]
    # the same pair given once per seed: pooled over the two, each seed once (here both seeds agree exactly)
    seed1 = []  # the same scores under other runs' names, as a second seed
    for name, path in (("base", out), ("flipped", tmp_path / "flipped.json")):
        seed1.append(tmp_path / f"{name}-seed1.json")
        seed1[-1].write_text(json.dumps([{**r, "model": f"{r['model']}-seed1"} for r in json.loads(path.read_text())]))
    pooled = run("eval.py", ["--compare", str(out), str(tmp_path / "flipped.json"), "--compare", *map(str, seed1)],
                 tmp_path).stdout
    assert "pooled over 2 seeds" in pooled and "+0.0 points over 2 seeds (seed SE 0.0" in pooled
    assert f"  named object best: {100 * expected:+.1f} points over 2 seeds (seed SE 0.0" in pooled
    # the command line on a picture of its own
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    cli = [sys.executable, "-m", "mmkit", "segment", str(tmp_path / "red.png"), "the red circle", "--model",
           str(tmp_path / "run" / "final"), "--json"]
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cli, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    if record["mask"] is None:  # an untrained model may answer without <SEG>: "no mask", not a crash
        assert "<SEG>" not in record["answer"]
    else:
        mask = Image.open(record["mask"])
        assert mask.size == (40, 30) and Path(record["overlay"]).is_file()
    if sasp != "null":  # the mask branch for certain: the same model made to answer with <SEG>, in-process
        import numpy as np

        from mmkit.cli import main
        from mmkit.llm import FrozenLM

        def answer_with_seg(self, batch, image_embeds, **kwargs):
            ids = self.tokenizer(" the <SEG> .", add_special_tokens=False, return_tensors="pt").input_ids
            return ids.expand(batch.input_ids.shape[0], -1)

        monkeypatch.setattr(FrozenLM, "generate_ids", answer_with_seg)
        assert main(["segment", str(tmp_path / "red.png"), "the red circle", "--model", str(tmp_path / "run" / "final"),
                     "--out", str(tmp_path / "forced.mask.png"), "--json"]) == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert "<SEG>" in record["answer"] and record["mask"] == str(tmp_path / "forced.mask.png")
        mask = np.asarray(Image.open(record["mask"]))
        assert mask.shape == (30, 40) and set(np.unique(mask)) <= {0, 255} and record["pixels"] == (mask > 0).sum()
        assert record["overlay"] == str(tmp_path / "forced.overlay.png")
        tinted = np.asarray(Image.open(record["overlay"]).convert("RGB")) != np.array([200, 30, 30])
        assert tinted.shape == (30, 40, 3) and (tinted.any(-1) >= (mask > 0)).all()  # the mask's pixels in red
    for bad, message in (([*cli[:5], " "], "expression is empty"), ([*cli, "--out", str(tmp_path / "m.jpg")], "PNG"),
                         ([*cli[:6], "--model", str(tmp_path)], "no trained READ model")):
        done = subprocess.run(bad, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def test_a_run_starts_from_a_trained_seg_only_bundle_with_sasp_turned_on(tiny_parts, sam_dir, tmp_path):
    """``model.init_from``, READ's official recipe (SasP switched on over a trained <SEG>-only model): the new run's
    trained parts start as the bundle's, where a fresh run's do not; a bundle on another SAM is refused early."""
    from safetensors.torch import load_file

    common = [f"model.encoder=hf:{tiny_parts / 'vision'}", f"model.llm={tiny_parts / 'llm'}", "model.token_grid=3",
              f"model.sam={sam_dir}", "data.size=4", "data.options={render_size: 30}",
              f"data.feature_cache={tmp_path / 'f'}", "train.batch_size=2", "train.warmup_steps=1", "--max_train_steps", "1"]
    run("train.py", [*common, "model.seg={prompt_dim: 20, lora_r: 2, sasp: null}", "train.seed=1",  # another start
                     f"train.output_dir={tmp_path / 'seg'}"], tmp_path)
    read = [*common, "model.seg={prompt_dim: 20, lora_r: 2, sasp: {down_sample: 1, num_points: 8}}",
            "train.learning_rate=1e-12"]  # one step that moves nothing: the run's weights are where it started
    done = run("train.py", [*read, f"model.init_from={tmp_path / 'seg' / 'final'}", f"train.output_dir={tmp_path / 'warm'}"],
               tmp_path)
    assert "READ initialised from" in done.stdout
    run("train.py", [*read, f"train.output_dir={tmp_path / 'fresh'}"], tmp_path)

    def weights(run_dir):
        return {part: load_file(run_dir / "final" / part / "adapter.safetensors")
                for part in ("connector", "llm", "head", "mask_decoder")}

    start, warm, fresh = weights(tmp_path / "seg"), weights(tmp_path / "warm"), weights(tmp_path / "fresh")
    for part, tensors in start.items():
        assert set(warm[part]) == set(tensors), part
        assert max((warm[part][k].float() - v.float()).abs().max().item() for k, v in tensors.items()) < 1e-6, part
        if part != "mask_decoder":  # (both runs' decoders start as the SAM checkpoint's and barely moved)
            assert max((fresh[part][k].float() - v.float()).abs().max().item() for k, v in tensors.items()) > 1e-4, part
    assert json.loads((tmp_path / "warm" / "final" / "bundle.json").read_text())["parts"]["seg"]["sasp"] is not None
    other = tmp_path / "other-sam"
    tiny_sam(1).save_pretrained(other)
    caches = sorted(p.name for p in (tmp_path / "f").iterdir())
    for extra, message in (([f"model.sam={other}"], "trained on other frozen parts than this run's: sam (bundle"),
                           (["model.seg.head_input_norm=batch"], "head_input_norm (bundle 'none', run 'batch')")):
        done = subprocess.run([sys.executable, str(ROOT / "recipes" / "segment" / "train.py"), *read, *extra,
                               f"model.init_from={tmp_path / 'seg' / 'final'}", f"train.output_dir={tmp_path / 'bad'}"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300,
                              env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                   "OMP_NUM_THREADS": "1"})
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "bad").exists()  # refused before the loop claimed the folder or cached anything
        assert sorted(p.name for p in (tmp_path / "f").iterdir()) == caches
    # a bundle that trained the whole word-embedding table starts only runs that train it too; one that trained
    # only its new rows starts either kind
    import shutil

    from mmkit.training.seg import SegRecipeConfig, init_bundle

    shutil.copytree(tmp_path / "seg" / "final", tmp_path / "all")
    meta = json.loads((tmp_path / "all" / "bundle.json").read_text())
    meta["parts"]["seg"]["word_embeddings"] = "all"
    (tmp_path / "all" / "bundle.json").write_text(json.dumps(meta))
    model = {"encoder": f"hf:{tiny_parts / 'vision'}", "llm": str(tiny_parts / "llm"), "token_grid": 3,
             "sam": str(sam_dir), "seg": {"prompt_dim": 20, "lora_r": 2}}

    def start(bundle, words):
        return init_bundle(SegRecipeConfig.from_dict(
            {"model": {**model, "init_from": str(bundle), "seg": {**model["seg"], "word_embeddings": words}}}))

    with pytest.raises(ValueError, match="trained the LLM's whole word-embedding table.*word_embeddings=all"):
        start(tmp_path / "all", "new_rows")
    assert set(start(tmp_path / "all", "all")) == set(start(tmp_path / "seg" / "final", "all")) == set(weights(tmp_path / "seg"))


def test_a_source_without_masks_is_refused(tiny_parts, sam_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "segment" / "train.py"), f"model.encoder=hf:{tiny_parts / 'vision'}",
         f"model.llm={tiny_parts / 'llm'}", f"model.sam={sam_dir}", "data.source=shapesworld", "data.size=4",
         f"train.output_dir={tmp_path / 'run'}", "--max_train_steps", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "no referring expressions with masks" in done.stderr


def test_sam_embedding_cache_notices_a_retrained_sam(sam_dir, tmp_path):
    import os
    import shutil

    from mmkit.training.seg import sam_fingerprint

    copy = tmp_path / "sam"
    shutil.copytree(sam_dir, copy)
    sam = tiny_sam(0)
    before = sam_fingerprint(sam, str(copy))
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # written again
    assert sam_fingerprint(sam, str(copy)) != before
    assert sam_fingerprint(sam, "facebook/sam-vit-base")["name"] == "facebook/sam-vit-base"



def test_the_location_probe_finds_a_linear_signal_and_not_noise():
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("diagnose", ROOT / "recipes" / "segment" / "diagnose.py")
    diagnose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnose)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 30))
    y = np.stack([x[:, 0] * 0.3 + 0.5, x[:, 1] * -0.2 + 0.5], 1) + rng.normal(scale=0.01, size=(200, 2))
    groups = np.arange(200) // 3  # three expressions per scene
    assert min(diagnose.ridge_r2(x, y, 1.0, groups=groups)) > 0.95
    assert max(diagnose.ridge_r2(rng.normal(size=(200, 30)), y, 1.0, groups=groups)) < 0.1  # unrelated: nothing
    # a scene's rows share a fold: a state that only names the scene predicts nothing about held-out scenes,
    # while folds of rows (scenes shuffled across them) would leak each scene's answer
    order = rng.permutation(200)
    scene_code, y_scene = np.eye(67)[groups][order], rng.normal(size=(67, 2))[groups][order]
    assert max(diagnose.ridge_r2(scene_code, y_scene, 1.0, groups=groups[order])) < 0.1
    assert min(diagnose.ridge_r2(scene_code, y_scene, 1.0)) > 0.3
