"""What a user who gets something wrong sees: one line naming the mistake and what is accepted, exit status 2.

Every row is a mistake met from the command line or a recipe. Tracebacks are for real bugs (and --debug).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mmkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tiny_parts, tmp_path_factory):
    """A trained-looking tiny model bundle, an image, and broken variants of both."""
    from mmkit.connectors import build_connector
    from mmkit.encoders import load_encoder
    from mmkit.llm import FrozenLM
    from mmkit.models import VisionLanguageModel

    root = tmp_path_factory.mktemp("bad")
    encoder, llm = load_encoder(f"hf:{tiny_parts / 'vision'}"), FrozenLM.from_pretrained(tiny_parts / "llm")
    model = VisionLanguageModel(encoder, build_connector("linear", vision_dim=encoder.dim, llm_dim=llm.hidden_size), llm,
                                caption_prompt="<image> caption :", vqa_prompt="<image> {question} answer :")
    model.save_pretrained(root / "model", llm_name=str(tiny_parts / "llm"))
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "good.png")
    (root / "truncated.png").write_bytes((root / "good.png").read_bytes()[:60])
    (root / "notes.png").write_text("not an image")
    connector = root / "model" / "connector"
    for name in ("nan", "zeros", "torn", "badjson"):
        (root / name).mkdir()
        (root / name / "adapter.json").write_text((connector / "adapter.json").read_text())
    state = build_connector("linear", vision_dim=encoder.dim, llm_dim=llm.hidden_size).state_dict()
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(root / "nan" / "adapter.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(root / "zeros" / "adapter.safetensors"))
    (root / "torn" / "adapter.safetensors").write_bytes((connector / "adapter.safetensors").read_bytes()[:100])
    (root / "badjson" / "adapter.json").write_text('{"kind": "linear", ')
    (root / "empty").mkdir()
    (root / "notes.mp4").write_text("not a video")
    (root / "empty.mp4").write_bytes(b"")
    (root / "folder.png").mkdir()
    return root


def run(argv: list[str]) -> tuple[int, str]:
    """Exit status and stderr of ``mmkit <argv>`` run in this process."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's own errors
            code = stop.code
    return code, err.getvalue()


CLI_CASES = [
    # (what, argv with {root}, message that must appear)
    ("missing image", ["caption", "{root}/missing.png"], r"cannot load image .*missing.png.*no such file"),
    ("truncated image", ["caption", "{root}/truncated.png"], r"truncated.png.*truncated or corrupt"),
    ("text file as image", ["caption", "{root}/notes.png"], r"notes.png"),
    ("folder without a model", ["caption", "{root}/good.png", "--connector", "{root}/empty"], r"no trained model in"),
    ("missing model folder", ["demo", "--connector", "{root}/nowhere", "--scenes", "1"], r"no such model folder"),
    ("NaN weights", ["caption", "{root}/good.png", "--connector", "{root}/nan"], r"holds NaN or inf"),
    ("all-zero weights", ["caption", "{root}/good.png", "--connector", "{root}/zeros"], r"all zeros"),
    ("truncated safetensors", ["caption", "{root}/good.png", "--connector", "{root}/torn"],
     r"torn/adapter.safetensors is not a readable safetensors file"),
    ("bad adapter.json", ["caption", "{root}/good.png", "--connector", "{root}/badjson"], r"is not valid JSON"),
    ("negative token budget", ["caption", "{root}/good.png", "--max-new-tokens", "-5"], r"expected a positive integer"),
    ("empty question", ["vqa", "{root}/good.png", "  ", "--connector", "{root}/model"], r"question 1 is empty"),
    ("missing video", ["video-qa", "{root}/nope.mp4", "what?"], r"cannot load clip .*nope.mp4.*no such file"),
    ("text file as video", ["video-qa", "{root}/notes.mp4", "what?"], r"cannot read video .*notes.mp4"),
    ("zero-length video", ["video-qa", "{root}/empty.mp4", "what?"], r"cannot read video .*empty.mp4"),
    ("folder without frames", ["video-qa", "{root}/empty", "what?"], r"empty.*holds no frame images"),
    ("text file as sound", ["video-qa", "{root}/good.png", "what?", "--audio", "{root}/notes.png"],
     r"cannot load audio .*notes.png"),
    ("fps with no whole audio span", ["video-qa", "{root}/good.png", "what?", "--fps", "3"],
     r"50 / fps must be a whole number"),
    ("empty question about a clip", ["video-qa", "{root}/good.png", " "], r"question 1 is empty"),
    ("no video model", ["video-qa", "{root}/good.png", "what?", "--model", "{root}/empty"],
     r"no trained video model in"),
    ("image model asked about a clip", ["video-qa", "{root}/good.png", "what?", "--model", "{root}/model"],
     r"reads single images .*not clips"),
    ("huge seed", ["generate", "a red star", "--seed", "18446744073709551615"], r"out of range; expected a seed"),
    ("output without extension", ["generate", "a red star", "--out", "{root}/grid"], r"unknown image extension"),
    ("output is a folder", ["generate", "a red star", "--out", "{root}/folder.png"], r"folder.png is a folder"),
    ("missing pipeline", ["generate", "a red star", "--model", "{root}/nope"], r"model folder not found"),
    ("two patches on one layer", ["generate", "a red star", "--steps", "1", "--tome", "--agent-sd", "--out",
                                  "{root}/x.png"], r"both claim the attention processor"),
]


@pytest.mark.parametrize("what, argv, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_mistakes_end_in_one_line_and_status_2(world, what, argv, message):
    import re

    code, err = run([a.format(root=world) for a in argv])
    assert code == 2, (what, err)
    assert re.search(message, err), err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line]  # progress bars of loading
    if lines[0].startswith("usage:"):  # argparse's own errors: its usage, then the one error line
        lines = lines[-1:]
    assert len(lines) == 1 and "error: " in lines[0], err


def test_user_text_is_plain_data(world, capsys):
    code = main(["vqa", str(world / "good.png"), "is there an <image> or {x} here?", "--connector", str(world / "model"),
                 "--max-new-tokens", "2"])
    assert code == 0 and "Q: is there an <image> or {x} here?" in capsys.readouterr().out


def test_no_traceback_unless_debug(world):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mmkit", "caption", str(world / "missing.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "missing.png" in done.stderr
    done = subprocess.run([sys.executable, "-m", "mmkit", "--debug", *cmd[3:]], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode != 0 and "Traceback" in done.stderr


# ---------------------------------------------------------------- recipes
RECIPE_CASES = [
    ("unknown key", ["train.learnig_rate=1"], r"unknown key 'learnig_rate'; did you mean 'learning_rate'"),
    ("log_every 0", ["train.log_every=0"], r"train.log_every must be an integer >= 1"),
    ("save_every 0", ["train.save_every=0"], r"train.save_every must be an integer >= 1"),
    ("no steps", ["train.max_train_steps=0"], r"max_train_steps must be an integer >= 1"),
    ("unknown connector", ["model.connector=foo"], r"unknown connector kind 'foo'; accepted: linear, mean_frames, qformer, vlap"),
    ("unknown source option", ["data.options.rendersize=3"], r"did you mean 'render_size'"),
    ("pretrained start for a linear connector", ["model.connector=linear", "model.connector_init=blip2/model"],
     r"connector kind 'linear' cannot start from a pretrained checkpoint; kinds that can: qformer"),
    ("missing BLIP-2 checkpoint", ["model.connector=qformer", "model.connector_init=nowhere/blip2.safetensors"],
     r"model.connector_init: no file or folder 'nowhere/blip2.safetensors'"),
    ("batch larger than the data", ["train.batch_size=64"], r"batch_size 64 is larger than the 24 training examples"),
]


@pytest.mark.parametrize("what, overrides, message", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_recipe_mistakes_end_in_one_line(tiny_parts, tmp_path, what, overrides, message, capsys):
    import re

    from mmkit.cli import run_guarded
    from mmkit.training.vlm import recipe_main

    base = [f"model.encoder=hf:{tiny_parts / 'vision'}", f"model.llm={tiny_parts / 'llm'}", "model.token_grid=2",
            "model.caption_prompt=<image> caption :", "model.vqa_prompt=<image> {question} answer :",
            "data.size=12", "data.options.render_size=30", f"data.feature_cache={tmp_path / 'features'}",
            f"train.output_dir={tmp_path / 'run'}", "train.batch_size=4"]
    default = str(ROOT / "recipes" / "caption" / "configs" / "shapes_vlap.yaml")
    code = run_guarded(lambda: recipe_main(default, ["train.max_train_steps=1", *base, *overrides]), prog="train.py")
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "features").exists() or what == "batch larger than the data"  # no work before the check


def test_training_into_a_finished_run_is_refused_from_the_command_line(tiny_parts, tmp_path):
    base = [f"model.encoder=hf:{tiny_parts / 'vision'}", f"model.llm={tiny_parts / 'llm'}", "model.token_grid=2",
            "model.caption_prompt=<image> caption :", "model.vqa_prompt=<image> {question} answer :",
            "data.size=4", "data.options.render_size=30", f"data.feature_cache={tmp_path / 'features'}",
            f"train.output_dir={tmp_path / 'run'}", "train.batch_size=4", "model.connector=linear"]
    script = [sys.executable, str(ROOT / "recipes" / "caption" / "train.py"), "--max_train_steps", "1", *base]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    assert subprocess.run(script, capture_output=True, text=True, timeout=300, env=env).returncode == 0
    final = (tmp_path / "run" / "final" / "connector" / "adapter.safetensors").read_bytes()
    again = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "run" / "final" / "connector" / "adapter.safetensors").read_bytes() == final
