"""Tiny random instances of the real classes mmkit plugs into, for fast offline tests.

Sizes are small and deliberately distinct per axis (odd where the class allows), so a transposed or
mis-reshaped tensor fails loudly instead of lining up by accident. Each builder takes a ``seed`` and
returns a model in eval mode. Shipped in the package so users can test their own add-ons the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_llama(seed: int = 0, *, vocab_size: int = 131, hidden_size: int = 36, layers: int = 2,
               tie_word_embeddings: bool = True):
    """``LlamaForCausalLM``: 3 query heads of 12 dims over 1 kv head (grouped-query), vocab 131; the output head
    shares the embedding table (as SmolLM2's) unless ``tie_word_embeddings=False``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=52,
        num_hidden_layers=layers,
        num_attention_heads=3,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_clip_vision(seed: int = 0, *, image_size: int = 30, patch_size: int = 6):
    """``CLIPVisionModel``: 30 px images, 6 px patches -> 25 patches + CLS, hidden 40 (5 heads of 8)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    _seeded(seed)
    cfg = CLIPVisionConfig(
        hidden_size=40,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=5,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=24,
    )
    return CLIPVisionModel(cfg).eval()


def tiny_clip_text(seed: int = 0, *, vocab_size: int = 211, max_length: int = 13):
    """``CLIPTextModel``: hidden 24 (3 heads of 8), 13 positions: a Stable Diffusion text encoder stand-in."""
    from transformers import CLIPTextConfig, CLIPTextModel

    _seeded(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=24,
        intermediate_size=44,
        num_hidden_layers=2,
        num_attention_heads=3,
        max_position_embeddings=max_length,
        projection_dim=20,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(cfg).eval()


def tiny_sam(seed: int = 0):
    """``SamModel``: 48 px images, 8 px patches -> 6x6 embedding grid, 20-d prompt/decoder width."""
    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    _seeded(seed)
    vision = SamVisionConfig(
        hidden_size=24,
        output_channels=20,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=48,
        patch_size=8,
        window_size=3,
        global_attn_indexes=[1],
        num_pos_feats=10,
        mlp_dim=40,
    )
    prompt = SamPromptEncoderConfig(hidden_size=20, image_size=48, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(
        hidden_size=20, mlp_dim=36, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=28
    )
    cfg = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    return SamModel(cfg).eval()


def tiny_qformer(seed: int = 0, *, encoder_hidden_size: int = 40):
    """``Blip2QFormerModel``: hidden 48 (3 heads of 16), 2 layers, cross-attention in every layer."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    _seeded(seed)
    cfg = Blip2QFormerConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=68,
        cross_attention_frequency=1,
        encoder_hidden_size=encoder_hidden_size,
        max_position_embeddings=64,
        vocab_size=97,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return Blip2QFormerModel(cfg).eval()


def tiny_unet(seed: int = 0, *, sample_size: int = 16, cross_attention_dim: int = 24):
    """``UNet2DConditionModel``: 2 resolutions (16 -> 8 latent px), channels (32, 48), 8 heads (diffusers reads attention_head_dim as the head count)."""
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 48),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def tiny_open_clip(seed: int = 0):
    """An ``open_clip.CLIP`` built from a config dict: ViT with 24 px images / 8 px patches, width 40."""
    import open_clip

    _seeded(seed)
    vision_cfg = {"image_size": 24, "patch_size": 8, "width": 40, "layers": 2, "head_width": 8, "mlp_ratio": 1.5}
    text_cfg = {"context_length": 11, "vocab_size": 173, "width": 32, "heads": 4, "layers": 2}
    return open_clip.CLIP(embed_dim=20, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()



TINY_WORDS = (
    "a an the is are there of to and what how many colour color shape object objects left right above below "
    "small large red green blue yellow purple orange white circle square triangle star hexagon cross diamond "
    "yes no one two three caption question answer : ? , . describe image"
).split()


def tiny_tokenizer(words: tuple[str, ...] | list[str] = TINY_WORDS):
    """A word-level ``PreTrainedTokenizerFast`` (ids < 100) with pad/bos/eos/unk and a chat template.

    Fits ``tiny_llama``'s vocabulary; words outside ``words`` map to ``<unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> answer : {% endif %}"
    )
    return tok

def save_tiny_vlm_parts(root: str | os.PathLike) -> Path:
    """Write a tiny CLIP vision tower (30 px, with its image processor) to ``root/vision`` and a tiny Llama with
    :func:`tiny_tokenizer` to ``root/llm``: load them as ``hf:<root>/vision`` and ``FrozenLM.from_pretrained(root/llm)``.
    Returns ``root``."""
    from transformers import CLIPImageProcessor

    root = Path(root)
    tiny_clip_vision().save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(root / "vision")
    tiny_llama().save_pretrained(root / "llm")
    tiny_tokenizer().save_pretrained(root / "llm")
    return root


__all__ = [
    "save_tiny_vlm_parts",
    "tiny_clip_text",
    "tiny_clip_vision",
    "tiny_llama",
    "tiny_open_clip",
    "tiny_qformer",
    "tiny_sam",
    "tiny_tokenizer",
    "tiny_unet",
]
