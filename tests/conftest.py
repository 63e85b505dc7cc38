import os

# Tests never touch the network, and the Triton kernel runs in its CPU interpreter when no GPU is
# present. Both must be set before transformers / triton are first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def unet():
    """A tiny random diffusers UNet2DConditionModel (latents (B, 4, 16, 16), context width 24)."""
    from mmkit.testing.tiny import tiny_unet

    return tiny_unet(seed=0)


@pytest.fixture
def inputs():
    """(latents (2, 4, 16, 16), timestep, context (2, 5, 24)) for the ``unet`` fixture."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500), torch.randn(2, 5, 24, generator=g)


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """Folder with ``vision/`` (tiny CLIP vision tower, 30 px) and ``llm/`` (tiny Llama + word tokenizer)."""
    from mmkit.testing import save_tiny_vlm_parts

    return save_tiny_vlm_parts(tmp_path_factory.mktemp("tiny_parts"))
