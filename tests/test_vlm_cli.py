"""The VLM from the command line and the demo page, on tiny real classes; bad inputs fail clearly."""

import numpy as np
import pytest
from PIL import Image

from mmkit.cli import main
from mmkit.connectors import build_connector
from mmkit.encoders import load_encoder
from mmkit.llm import FrozenLM
from mmkit.models import VisionLanguageModel


@pytest.fixture(scope="module")
def connector_dir(tiny_parts, tmp_path_factory):
    root, out = tiny_parts, tmp_path_factory.mktemp("cli")
    encoder = load_encoder(f"hf:{root / 'vision'}")
    llm = FrozenLM.from_pretrained(root / "llm")
    model = VisionLanguageModel(encoder, build_connector("linear", vision_dim=encoder.dim, llm_dim=llm.hidden_size),
                                llm, caption_prompt="<image> caption :", vqa_prompt="<image> {question} answer :")
    model.save_pretrained(out / "conn", llm_name=str(root / "llm"), encoder={"spec": f"hf:{root / 'vision'}"})
    return out / "conn"


@pytest.fixture
def odd_images(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    paths = {}
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray((np.arange(480).reshape(20, 24) * 130).astype(np.uint16)).save(tmp_path / "gray16.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 24), 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    for name in ("cmyk.jpg", "gray16.png", "palette.png", "rgba.png", "gray.png"):
        paths[name] = tmp_path / name
    return paths


def test_caption_every_image_mode(connector_dir, odd_images, capsys):
    files = [str(p) for p in odd_images.values()]
    assert main(["caption", *files, "--connector", str(connector_dir), "--max-new-tokens", "3", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all('"caption"' in line for line in lines)


def test_vqa_command(connector_dir, odd_images, capsys):
    assert main(["vqa", str(odd_images["gray.png"]), "what colour is it ?", "how many ?",
                 "--connector", str(connector_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and out.count("A: ") == 2


def test_unknown_encoder_prefix_names_the_accepted_forms():
    with pytest.raises(ValueError, match="open_clip:ARCH@PRETRAINED"):
        load_encoder("clip:ViT-B-32")


def test_demo_page(connector_dir, tmp_path, capsys):
    assert main(["demo", "--connector", str(connector_dir), "--out", str(tmp_path / "demo"), "--scenes", "2"]) == 0
    page = (tmp_path / "demo" / "index.html").read_text()
    assert page.count("<img src='data:image/png;base64,") == 2 + 4  # scenes + photos
    assert "Held-out ShapesWorld scenes" in page and "Real photos" in page
    assert "demo page:" in capsys.readouterr().out
