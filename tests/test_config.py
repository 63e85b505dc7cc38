from dataclasses import dataclass

import pytest

from mmkit.config import StrictConfig, atomic_write_text


@dataclass
class Inner(StrictConfig):
    width: int = 4


@dataclass
class Outer(StrictConfig):
    num_queries: int = 32
    window: tuple[int, int] = (1, 2)
    inner: Inner | None = None


def test_unknown_key_did_you_mean():
    with pytest.raises(ValueError, match="unknown key 'num_querys'; did you mean 'num_queries'"):
        Outer.from_dict({"num_querys": 3})
    with pytest.raises(ValueError, match="Accepted keys"):
        Outer().replace(zzz=1)


def test_nested_round_trip(tmp_path):
    cfg = Outer.from_dict({"num_queries": 8, "window": [3, 4], "inner": {"width": 9}})
    assert cfg.inner == Inner(width=9) and cfg.window == (3, 4)
    path = tmp_path / "c.json"
    cfg.save_json(path)
    assert Outer.load_json(path) == cfg
    with pytest.raises(FileNotFoundError, match="not found"):
        Outer.load_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Outer.load_json(tmp_path / "bad.json")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "x.txt", "hello")
    assert (tmp_path / "a" / "x.txt").read_text() == "hello"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.txt"]


def test_a_partial_section_overrides_the_fields_own_default():
    """``data: {world: {image_size: 16}}`` changes the image size of the recipe's world, not the class defaults."""
    from mmkit.training.t2i import T2ITrainConfig
    from mmkit.training.t2i_adapters import ProjectionTrainConfig

    t2i = T2ITrainConfig.from_dict({"data": {"world": {"image_size": 16}}})
    assert t2i.data.world.image_size == 16 and t2i.data.world.shapes == ("circle", "square", "triangle", "star")
    two = ProjectionTrainConfig.from_dict({"data": {"world": {"image_size": 16}}})
    assert two.data.world.min_objects == two.data.world.max_objects == 2
    assert T2ITrainConfig.from_dict(t2i.to_dict()) == t2i  # full dicts (saved runs) read back unchanged


def test_recipe_overrides_may_sit_on_both_sides_of_the_options():
    """``projection.kind=clp --max_train_steps 9 train.save_every=3``: every override applies (argparse's plain
    parse_args rejected the one after the option)."""
    from mmkit.training.config import parse_recipe_args
    from mmkit.training.t2i_adapters import ProjectionTrainConfig

    cfg, args = parse_recipe_args(
        ProjectionTrainConfig, None, description="", epilog="",
        argv=["projection.kind=clp", "--max_train_steps", "9", "train.save_every=3", "--output_dir", "o"])
    assert (cfg.projection.kind, cfg.train.max_train_steps, cfg.train.save_every, cfg.train.output_dir) == \
        ("clp", 9, 3, "o")
    assert args.overrides == ["projection.kind=clp", "train.save_every=3"]


def test_atomic_write_folder_keeps_a_finished_copy_and_fills_an_empty_folder(tmp_path):
    from mmkit.config import atomic_write_folder

    def write(text):
        return lambda tmp: (tmp / "a.txt").write_text(text)

    assert atomic_write_folder(tmp_path / "new", write("one")) == tmp_path / "new"
    atomic_write_folder(tmp_path / "new", write("two"))  # another process finished first: its copy stays
    assert (tmp_path / "new" / "a.txt").read_text() == "one"
    (tmp_path / "empty").mkdir()
    atomic_write_folder(tmp_path / "empty", write("three"))
    assert (tmp_path / "empty" / "a.txt").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # no temporary sibling left


def test_atomic_writes_get_the_permissions_a_plain_write_would(tmp_path):
    import os
    import stat

    from mmkit.config import atomic_write_folder, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "report.json", "{}")
        folder = atomic_write_folder(tmp_path / "model", lambda d: (d / "w.txt").write_text("x"))
        from mmkit.training.checkpoint import save_checkpoint

        save_checkpoint(tmp_path / "run", 3, write_adapter=lambda d: None)
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "report.json") == mode(plain) == 0o640  # not mkstemp's private 0600
    assert mode(folder) == mode(tmp_path / "plain_dir") == mode(tmp_path / "run" / "step-000003") == 0o750
    os.chmod(tmp_path / "report.json", 0o604)
    atomic_write_text(tmp_path / "report.json", "{\"again\": 1}")  # rewriting keeps the file's own permissions
    assert mode(tmp_path / "report.json") == 0o604 and os.umask(old) == old  # and the umask is as it was
