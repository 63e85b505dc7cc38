"""The adapter recipes on a frozen pipeline (CLP / WiCLP, NeTI / textual inversion): they train only the adapter,
resume exactly, save adapter folders that ``mmkit generate --text-projection / --neti`` load, and refuse bad input."""

import json

import pytest
import torch
from test_t2i import _recipe  # pytest prepends tests/ to sys.path

from mmkit.adapters import load_adapter
from mmkit.text_encoders import DEFAULT_TEXT_ENCODER, load_text_encoder

SMALL = ["data.world.image_size=16", "train.batch_size=2", "train.log_every=1", "train.save_every=2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny 16 px pixel pipeline on the real MiniLM text encoder, saved as a pipeline folder."""
    from mmkit.diffusion.pixel_pipeline import PixelTextToImagePipeline
    from mmkit.training.t2i import ModelConfig, T2ITrainConfig, build_sampler, build_unet

    model = ModelConfig(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), head_dim=8, norm_num_groups=4)
    torch.manual_seed(0)
    text_encoder, tokenizer = load_text_encoder(DEFAULT_TEXT_ENCODER)
    pipe = PixelTextToImagePipeline(unet=build_unet(model, 16, 384).eval(),
                                    scheduler=build_sampler(T2ITrainConfig.from_dict({}).noise),
                                    text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_source=DEFAULT_TEXT_ENCODER, max_length=12)
    out = tmp_path_factory.mktemp("frozen") / "pipe"
    pipe.save_pretrained(out)
    return out


def losses(out):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("kind", ["wiclp", "clp"])
def test_projection_recipe_trains_only_the_projection_and_resumes_exactly(folder, tmp_path, kind):
    recipe = _recipe("train_projection")
    args = [f"model.pipeline={folder}", f"projection.kind={kind}", "train.learning_rate=1e-3", *SMALL]
    out = tmp_path / "run"
    recipe.main(["--max_train_steps", "2", "--output_dir", str(out), *args])
    final = recipe.main(["--resume", "--max_train_steps", "3", "--output_dir", str(out), *args])
    straight = tmp_path / "straight"
    recipe.main(["--max_train_steps", "3", "--output_dir", str(straight), *args])
    assert losses(out) == losses(straight) and sorted(losses(out)) == [1, 2, 3]
    projector, meta = load_adapter(final, family="text_projection")
    assert projector.kind == kind and meta["pipeline"] == str(folder)
    fresh = type(projector)(projector.config)
    assert any(not torch.equal(a, b) for a, b in zip(projector.state_dict().values(), fresh.state_dict().values()))


def test_concept_recipes_train_and_generate_loads_them(folder, tmp_path, capsys):
    from mmkit.cli import main

    recipe = _recipe("train_concept")
    finals = {}
    for kind in ("neti", "textual_inversion"):
        finals[kind] = recipe.main(["--max_train_steps", "2", "--output_dir", str(tmp_path / kind),
                                    f"model.pipeline={folder}", f"model.kind={kind}", "data.num_images=2", *SMALL])
        adapter, _ = load_adapter(finals[kind], family="diffusion_mapper")
        assert adapter.kind == kind
    neti, _ = load_adapter(finals["neti"])
    assert neti.config.num_layers == 4 and neti.config.norm_scale > 0  # the tiny UNet: down 1, mid 1, up 2
    out = tmp_path / "g.png"
    base = ["--model", str(folder), "--steps", "2", "--num-images", "1", "--no-progress", "--out", str(out)]
    assert main(["generate", "a blue <S*>", *base, "--neti", str(finals["neti"]), "--truncation", "8"]) == 0
    assert "NeTIPatch(<S*>, truncation=8)" in capsys.readouterr().out and out.is_file()
    assert main(["generate", "a <S*>", *base, "--neti", str(finals["textual_inversion"])]) == 0
    capsys.readouterr()
    assert main(["generate", "a blue star", *base, "--neti", str(finals["neti"])]) == 2
    assert "no prompt names the concept; write its token '<S*>'" in capsys.readouterr().err


def test_bad_adapters_and_settings_are_refused(folder, tmp_path, capsys):
    from mmkit.adapters import build_adapter
    from mmkit.cli import main
    from mmkit.training.t2i_adapters import ConceptDataConfig, ConceptModelConfig, ProjectionConfig

    build_adapter("clp", dim=64).save_adapter(tmp_path / "wide")  # (an untrained WiCLP is all zeros: refused)
    out = tmp_path / "g.png"
    args = ["generate", "a red star", "--model", str(folder), "--steps", "1", "--num-images", "1", "--out", str(out)]
    assert main([*args, "--text-projection", str(tmp_path / "wide")]) == 2
    assert "the projector maps 64-d text states, but UNet2DConditionModel takes 384-d" in capsys.readouterr().err
    assert main([*args, "--neti", str(tmp_path / "wide")]) == 2
    assert "unknown diffusion_mapper kind 'clp'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="projection.kind must be one of"):
        ProjectionConfig(kind="linear")
    with pytest.raises(ValueError, match="model.kind must be one of"):
        ConceptModelConfig(kind="dreambooth")
    with pytest.raises(ValueError, match="exactly one"):
        ConceptDataConfig(templates=("a photo",))
    recipe = _recipe("train_concept")
    with pytest.raises(ValueError, match="super_category 'grey shape' must be one token"):
        recipe.main(["--max_train_steps", "1", "--output_dir", str(tmp_path / "bad"), f"model.pipeline={folder}",
                     "model.super_category=grey shape", *SMALL])


def test_binding_and_concept_evaluations_run_on_the_adapters(folder, tmp_path):
    projection = _recipe("train_projection").main(
        ["--max_train_steps", "1", "--output_dir", str(tmp_path / "wiclp"), f"model.pipeline={folder}", *SMALL])
    report = _recipe("eval").main(
        ["--model", str(folder), "--objects", "2", "--prompts", "2", "--judge-scenes", "2", "--steps", "2",
         "--grids", str(tmp_path / "binding"),  # adapter paths in the variant names become flat file names
         "--variants", f"--text-projection {projection}", f"--text-projection {projection} --switch-off 600"])
    assert report["world"]["min_objects"] == report["world"]["max_objects"] == 2
    assert all(row["relation_n"] == 2 for row in report["variants"].values())  # every prompt binds two objects
    paired = [row["paired_vs_base"] for name, row in report["variants"].items() if name != "base"]
    assert len(paired) == 2 and all(p[m]["examples"] == 2 for p in paired for m in ("all", "objects"))
    assert len(list((tmp_path / "binding").glob("*.png"))) == 3
    concept = _recipe("train_concept").main(
        ["--max_train_steps", "1", "--output_dir", str(tmp_path / "neti"), f"model.pipeline={folder}",
         "data.num_images=1", *SMALL])
    concept_args = ["--model", str(folder), "--adapters", str(concept), "--truncations", "none", "4", "--images", "1",
                    "--steps", "1", "--judge-scenes", "1", "--colours", "red", "--grids", str(tmp_path / "grids"),
                    "--json", str(tmp_path / "concept.json")]
    from mmkit.diffusion.pixel_pipeline import PixelTextToImagePipeline
    from mmkit.eval.report import PartialSamples

    calls, real, finish = [], PixelTextToImagePipeline.__call__, PartialSamples.finish
    PixelTextToImagePipeline.__call__ = lambda *a, **k: calls.append(1) or real(*a, **k)
    PartialSamples.finish = lambda self: None  # as if stopped before the report: the samples stay on disk
    try:
        first = _recipe("eval_concept").main(concept_args)
        assert len(calls) == 6  # 3 variants x 2 prompts
        kept = tmp_path / "concept.json.partial.safetensors"
        assert kept.is_file() and len(PartialSamples(kept, {}).items) == 0  # other settings: nothing reused
        PartialSamples.finish = finish
        report = _recipe("eval_concept").main(concept_args)  # resumes: every prompt from the kept file
    finally:
        PixelTextToImagePipeline.__call__, PartialSamples.finish = real, finish
    assert len(calls) == 6 and report["variants"] == first["variants"] and not kept.exists()
    assert report["concept"] == {"shape": "cross", "colour": "yellow"} and report["edit_colours"] == ["red"]
    assert len(report["variants"]) == 3  # the base model's words, NeTI untruncated and at 4
    assert report["judge_on_renders"]["shape"] == 1.0  # the extended judge reads real crosses
    assert len(list((tmp_path / "grids").glob("*.png"))) == 3
    # a new colour on a known shape (configs/neti_orange.yaml): the judge gains the colour the T2I world lacks
    concept = _recipe("train_concept").main(
        ["--max_train_steps", "1", "--output_dir", str(tmp_path / "ti"), f"model.pipeline={folder}",
         "model.kind=textual_inversion", "data.num_images=1", "data.world.shapes=[circle]",
         "data.world.colours=[orange]", *SMALL])
    report = _recipe("eval_concept").main(
        ["--model", str(folder), "--adapters", str(concept), "--images", "1", "--steps", "1", "--judge-scenes", "2",
         "--colours", "yellow", "orange"])
    assert report["concept"] == {"shape": "circle", "colour": "orange"} and report["edit_colours"] == ["yellow"]
    assert report["judge_on_renders"]["all"] == 1.0  # real orange and yellow circles, told apart
    with pytest.raises(ValueError, match="neither 'none' nor a non-negative integer"):
        _recipe("eval_concept").truncations_of(["half"])


def test_the_default_agent_sd_and_tome_variants_of_eval_run(folder):
    """eval.py's default variants parse their flags on their own parser (no --seed of the command there)."""
    report = _recipe("eval").main(["--model", str(folder), "--prompts", "2", "--judge-scenes", "2", "--steps", "2"])
    assert list(report["variants"]) == ["base", "--agent-sd", "--tome"]
