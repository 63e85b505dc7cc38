"""Reversible add-ons for diffusers models: patch(), the denoising context, mmkit attention processors,
ToMe and AgentSD.

    from mmkit.diffusion import patch, AgentSD
    with patch(pipe, AgentSD()):
        image = pipe(prompt).images[0]

Importing this package does not import diffusers; the patches work on the modules they are given.
"""

from .agent_sd import AgentSD, AgentSDAttnProcessor, AgentSDConfig, AgentSDStep, published_schedule
from .context import DenoiseContext
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
from .tome import MergeRecord, MergeRuntime, ToMe, ToMeAttnProcessor, ToMeConfig

__all__ = [
    "AgentSD",
    "AgentSDAttnProcessor",
    "AgentSDConfig",
    "AgentSDStep",
    "DenoiseContext",
    "MergeRecord",
    "MergeRuntime",
    "MmkitAttnProcessor",
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
