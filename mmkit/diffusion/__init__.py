"""Reversible add-ons for diffusers models: patch(), the denoising context, mmkit attention processors,
ToMe and AgentSD.

    from mmkit.diffusion import patch, AgentSD
    with patch(pipe, AgentSD()):
        image = pipe(prompt).images[0]

Importing this package does not import diffusers; the patches work on the modules they are given.
"""

from collections.abc import Callable

from ..registry import Registry
from .agent_sd import AgentSD, AgentSDAttnProcessor, AgentSDConfig, AgentSDStep, published_schedule
from .context import DenoiseContext
from .neti import NeTIConfig, NeTIMapper, NeTIPatch
from .patch import (
    Patch,
    PatchHandle,
    PatchTarget,
    ProcessorPatch,
    attention_layers,
    downsample_factors,
    patch,
    select_layers,
)
from .processors import MmkitAttnProcessor
from .text_projection import CLP, TextProjectionPatch, WiCLP
from .tome import MergeRecord, MergeRuntime, ToMe, ToMeAttnProcessor, ToMeConfig

PATCHES: Registry[Callable[[], Patch]] = Registry("patch")
"""Every patch mmkit ships, as a factory of its default instance; the generic tests (removal is bit-identical,
composition, a 3-step pipeline) run over all of them, so a new patch gets them by being registered here."""
PATCHES.register("tome", ToMe)
PATCHES.register("agent_sd", AgentSD)
PATCHES.register("mmkit_processors", lambda: ProcessorPatch(MmkitAttnProcessor))  # attention through mmkit.ops
PATCHES.register("clp", lambda: TextProjectionPatch("clp"))  # identity until trained: a no-op by default
PATCHES.register("wiclp", lambda: TextProjectionPatch("wiclp"))
PATCHES.register("neti", NeTIPatch)  # a fresh, untrained mapper sized from the UNet; acts on prompts with <S*>

__all__ = [
    "CLP",
    "PATCHES",
    "TextProjectionPatch",
    "WiCLP",
    "AgentSD",
    "AgentSDAttnProcessor",
    "AgentSDConfig",
    "AgentSDStep",
    "DenoiseContext",
    "MergeRecord",
    "MergeRuntime",
    "MmkitAttnProcessor",
    "NeTIConfig",
    "NeTIMapper",
    "NeTIPatch",
    "Patch",
    "PatchHandle",
    "PatchTarget",
    "ProcessorPatch",
    "ToMe",
    "ToMeAttnProcessor",
    "ToMeConfig",
    "attention_layers",
    "downsample_factors",
    "patch",
    "published_schedule",
    "select_layers",
]
