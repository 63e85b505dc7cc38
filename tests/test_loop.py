"""The shared training loop (mmkit.training.loop) on a tiny regression task: resume, safety, logging, DDP."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from loop_task import train_toy  # noqa: E402

from mmkit.training.loop import TrainLoopConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def weights(folder: Path) -> dict:
    return load_file(str(folder / "toy.safetensors"))


def log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_run_logs_means_checkpoints_and_final(tmp_path):
    final = train_toy(str(tmp_path / "run"), ["train.log_every=3", "train.keep_checkpoints=2"])
    records = log(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 6]
    assert {"loss", "abs_error", "lr", "s_per_step", "elapsed_s"} <= set(records[0])
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000004", "step-000006"]
    state = json.loads((tmp_path / "run" / "step-000006" / "state.json").read_text())
    assert state == {"step": 6, "seed": 0, "toy": True}  # the task's own state joins the loop's
    assert torch.equal(weights(final)["weight"], weights(tmp_path / "run" / "step-000006")["weight"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["log_every"] == 3 and config["data"]["size"] == 64  # the whole run's config


def test_resume_is_exact_and_log_means_cover_the_window(tmp_path):
    import shutil

    straight = train_toy(str(tmp_path / "a"), [])
    run = tmp_path / "b"  # stopped after step 3 (as after a kill), then resumed to 6
    train_toy(str(run), ["train.save_every=3"])
    shutil.rmtree(run / "step-000006")
    shutil.rmtree(run / "final")
    resumed = train_toy(str(run), ["train.save_every=3"], resume=True)
    assert torch.equal(weights(resumed)["weight"], weights(straight)["weight"])
    one = log(tmp_path / "a")
    means = log(train_toy(str(tmp_path / "c"), ["train.log_every=2"]).parent)
    assert means[0]["loss"] == pytest.approx((one[0]["loss"] + one[1]["loss"]) / 2, rel=1e-5)


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    big = train_toy(str(tmp_path / "big"), ["train.batch_size=8"])
    accumulated = train_toy(str(tmp_path / "acc"), ["train.batch_size=4", "train.gradient_accumulation_steps=2"])
    assert torch.allclose(weights(big)["weight"], weights(accumulated)["weight"], atol=1e-6)
    assert [r["step"] for r in log(tmp_path / "acc")] == [1, 2, 3, 4, 5, 6]  # a step is an optimiser update


def test_refuses_a_folder_holding_another_run_unless_told(tmp_path):
    run = tmp_path / "run"
    train_toy(str(run), [])
    before = weights(run / "final")
    with pytest.raises(FileExistsError, match=r"already holds a run .*--resume.*--overwrite"):
        train_toy(str(run), ["train.learning_rate=0.5"])
    assert torch.equal(weights(run / "final")["weight"], before["weight"])  # untouched
    train_toy(str(run), ["train.learning_rate=0.5", "train.max_train_steps=2"], overwrite=True)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002"]  # the old run's checkpoints are gone
    assert [r["step"] for r in log(run)] == [1, 2]
    (tmp_path / "empty").mkdir()
    train_toy(str(tmp_path / "empty"), ["train.max_train_steps=1"])  # an empty folder is fine


def test_resume_falls_back_from_a_corrupt_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    train_toy(str(run), ["train.max_train_steps=4", "train.keep_checkpoints=3"])
    (run / "step-000004" / "toy.safetensors").write_bytes(b"\x00garbage")
    with caplog.at_level("WARNING", logger="mmkit.training"):
        train_toy(str(run), ["train.max_train_steps=4", "train.keep_checkpoints=3"], resume=True)
    assert "step-000004" in caplog.text and "trying the previous one" in caplog.text
    straight = train_toy(str(tmp_path / "straight"), ["train.max_train_steps=4"])
    assert torch.equal(weights(run / "final")["weight"], weights(straight)["weight"])  # resumed at 2, redid 3-4
    for folder in run.glob("step-*"):
        (folder / "state.json").write_text("{not json")
    with pytest.raises(RuntimeError, match=r"no checkpoint .* could be read: step-000004: .*step-000002"):
        train_toy(str(run), ["train.max_train_steps=4"], resume=True)


def test_stops_instead_of_hanging_or_training_on_nan(tmp_path):
    with pytest.raises(RuntimeError, match="ran out at step 0"):
        train_toy(str(tmp_path / "a"), ["data.size=4", "train.batch_size=8"])  # no complete batch: no hang
    with pytest.raises(FloatingPointError, match="loss not finite at step 3"):
        train_toy(str(tmp_path / "b"), ["data.nan_at_step=3"])


@pytest.mark.parametrize("key, value, message", [
    ("log_every", 0, "log_every must be an integer >= 1"),
    ("save_every", 0, "save_every must be an integer >= 1"),
    ("max_train_steps", 0, "max_train_steps must be an integer >= 1"),
    ("batch_size", -2, "batch_size must be an integer >= 1"),
    ("learning_rate", 0.0, "learning_rate must be a positive number"),
    ("lr_schedule", "cosin", "lr_schedule must be one of"),
    ("mixed_precision", "fp8", "mixed_precision must be one of"),
    ("seed", 2**64 - 1, "seed must be below 2\\*\\*63"),
])
def test_config_values_are_range_checked(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainLoopConfig.from_dict({key: value})


def test_unavailable_tracker_is_named_before_any_work(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate.tracking import get_available_trackers

    if "tensorboard" in [str(t) for t in get_available_trackers()]:
        run = train_toy(str(tmp_path / "tb"), ["train.report_to=tensorboard"]).parent
        assert list(run.rglob("events.out.tfevents.*")), "tensorboard wrote no event file"
    else:
        with pytest.raises(ValueError, match="report_to='tensorboard' needs that tracker's package"):
            train_toy(str(tmp_path / "tb"), ["train.report_to=tensorboard"])
        assert not (tmp_path / "tb").exists()


def _launch(tmp_path: Path, processes: int, out: str, *args: str) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--main_process_port", "0"] if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, str(ROOT / "tests" / "helpers" / "loop_task.py"), str(tmp_path / out), *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_give_the_one_process_curve_and_resume(tmp_path):
    """DDP on CPU (gloo): two processes with batch 4 = one process with batch 8, within float32 rounding."""
    _launch(tmp_path, 1, "one", "train.batch_size=8")
    _launch(tmp_path, 2, "two", "train.batch_size=4")
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]  # one log line per step: only the main process writes
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["lr"] == a["lr"]
    assert torch.allclose(weights(tmp_path / "two" / "final")["weight"], weights(tmp_path / "one" / "final")["weight"],
                          atol=1e-5)
    _launch(tmp_path, 2, "resumed", "train.batch_size=4", "train.max_train_steps=6", "train.save_every=2")
    for name in ("step-000006", "final"):
        shutil.rmtree(tmp_path / "resumed" / name)
    _launch(tmp_path, 2, "resumed", "train.batch_size=4", "--resume")
    assert torch.allclose(weights(tmp_path / "resumed" / "final")["weight"],
                          weights(tmp_path / "two" / "final")["weight"], atol=1e-6)


def test_the_recorded_command_names_the_launcher_that_ran_it(monkeypatch):
    import sys

    from mmkit.training.loop import recipe_command

    monkeypatch.setattr(sys, "argv", ["recipes/segment/pretrain_sam.py", "--resume"])
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert recipe_command(None, "x.py") == "python recipes/segment/pretrain_sam.py --resume"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` sets for its child
    assert recipe_command(None, "x.py") == "accelerate launch recipes/segment/pretrain_sam.py --resume"
    assert recipe_command(["--max_train_steps", "2"], "recipes/caption/train.py") == (
        "recipes/caption/train.py --max_train_steps 2")
