"""Whisper tiny.en from the CTranslate2 carrier, converted by mmkit to transformers: exact and working."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkit.data.audio import AudioLoadError, load_audio
from mmkit.encoders.whisper import WhisperAudioEncoder, load_whisper, read_ct2_model, transcribe
from mmkit.hub import CARRIERS, carrier_path

SPEECH = Path(__file__).resolve().parents[1] / "assets" / "audio" / "open-the-door.wav"


@pytest.fixture(scope="module")
def whisper():
    return load_whisper("openai/whisper-tiny.en")


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z ]", "", text.lower()).split()


def test_the_converted_model_transcribes_speech(whisper):
    model, processor = whisper
    assert model.config.encoder_layers == 4 and model.config.d_model == 384 and model.config.vocab_size == 51864
    text = transcribe(model, processor, load_audio(SPEECH))
    assert words(text) == "open the door and close the window".split(), text


def test_the_encoder_equals_ctranslate2s_own(whisper):
    ctranslate2 = pytest.importorskip("ctranslate2")
    model, processor = whisper
    features = processor(load_audio(SPEECH), sampling_rate=16000, return_tensors="pt").input_features
    reference = ctranslate2.models.Whisper(str(carrier_path(CARRIERS["openai/whisper-tiny.en"])), device="cpu",
                                           compute_type="float32")
    theirs = np.array(reference.encode(ctranslate2.StorageView.from_array(features.numpy())))
    with torch.no_grad():
        ours = model.get_encoder()(features).last_hidden_state.numpy()
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()


def test_the_ct2_reader_refuses_what_it_cannot_read(tmp_path):
    spec, variables = read_ct2_model(carrier_path(CARRIERS["openai/whisper-tiny.en"]) / "model.bin")
    assert spec == "WhisperSpec" and variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00\x05")
    with pytest.raises(ValueError, match="truncated or not a CTranslate2 model.bin"):
        read_ct2_model(tmp_path / "model.bin")


def test_audio_encoder_states_at_50_hz(whisper):
    model, processor = whisper
    encoder = WhisperAudioEncoder(model.get_encoder(), processor)
    one_second, three_half = np.zeros(16000, np.float32), load_audio(SPEECH)
    states, mask = encoder.encode([one_second, three_half])
    assert states.shape == (2, 1500, 384) and mask.shape == (2, 1500)
    assert mask.sum(1).tolist() == [50, int(np.ceil(len(three_half) / 16000 * 50))]
    assert not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(ValueError, match="at most 30 s"):
        encoder.encode([np.zeros(16000 * 31, np.float32)])


def test_audio_loading(tmp_path):
    import soundfile as sf

    stereo = np.stack([np.sin(np.linspace(0, 100, 22050)), np.zeros(22050)], 1).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", stereo, 22050)
    audio = load_audio(tmp_path / "stereo.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1 and abs(len(audio) - 16000) <= 1
    assert np.abs(load_audio(np.zeros((8000, 2), np.int16), sampling_rate=8000)).max() == 0
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00")
    for bad, message in [(tmp_path / "missing.wav", "no such file"), (tmp_path / "broken.wav", "broken.wav"),
                         (np.zeros(0, np.float32), "no samples")]:
        with pytest.raises(AudioLoadError, match=message):
            load_audio(bad, sampling_rate=16000) if isinstance(bad, np.ndarray) else load_audio(bad)
    with pytest.raises(AudioLoadError, match="needs its sampling_rate"):
        load_audio(np.zeros(10, np.float32))


def test_the_converter_writes_a_folder_transformers_loads_as_converted_in_memory(tmp_path):
    """convert_ct2_whisper -> a folder WhisperForConditionalGeneration / WhisperProcessor load with no missing or
    unexpected keys, holding exactly the tensors of the in-memory conversion (same encoder output)."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from mmkit.encoders.whisper import convert_ct2_whisper, ct2_whisper_state_dict, whisper_config_from_ct2

    ct2 = carrier_path(CARRIERS["openai/whisper-tiny.en"])
    (tmp_path / "whisper-tiny.en").mkdir()  # an empty folder made beforehand is filled, not taken for a copy
    written = convert_ct2_whisper(ct2, tmp_path / "whisper-tiny.en")
    assert written == tmp_path / "whisper-tiny.en" and (written / "config.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written sibling left
    loaded, info = WhisperForConditionalGeneration.from_pretrained(written, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    loaded.eval()
    _, variables = read_ct2_model(ct2 / "model.bin")
    config = whisper_config_from_ct2(variables)
    in_memory = WhisperForConditionalGeneration(config).eval()
    in_memory.load_state_dict(ct2_whisper_state_dict(variables, config), strict=False)
    in_memory.tie_weights()
    theirs = loaded.state_dict()
    assert set(theirs) == set(in_memory.state_dict())
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(theirs[name], tensor), name
    assert loaded.proj_out.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()  # still tied
    processor = WhisperProcessor.from_pretrained(written)
    features = processor(load_audio(SPEECH), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        mine = in_memory.get_encoder()(features).last_hidden_state
        from_folder = loaded.get_encoder()(features).last_hidden_state
    assert mine.shape == (1, 1500, 384)
    torch.testing.assert_close(from_folder, mine, atol=0, rtol=0)
