"""CLP / WiCLP: a learned projection of the text encoder's final hidden states, for attribute binding
(Zarei et al., "Understanding and improving attribute binding in text-to-image models").

- ``clp``: one ``Linear(d, d)`` initialised to the identity, applied to every token state.
- ``wiclp``: windowed, residual: ``h + Conv1d(d, d, kernel=window)(h)`` over the token axis (window 5), the
  convolution zero-initialised.

Both start as the identity, so a freshly patched pipeline produces bit-identical images. The projection
is installed by :class:`TextProjectionPatch` as a forward pre-hook on the UNet, where the timestep is known
(the text encoder runs once per prompt): the UNet's ``encoder_hidden_states`` are projected only while
``t > switch_off`` (None: at every step), and only for the conditional rows: with classifier-free
guidance a diffusers pipeline stacks ``[unconditional, conditional]`` and the first half (the empty or
negative prompt) is never projected. The gate is a tensor comparison, so a compiled UNet makes no host
read for it::

    projector = build_adapter("wiclp", dim=768)
    with patch(pipe, TextProjectionPatch(projector, switch_off=600)):
        image = pipe("a red cube and a blue sphere").images[0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..adapters import Adapter, AdapterConfig, register_adapter
from .context import unet_call_inputs, with_encoder_hidden_states
from .patch import Patch, PatchTarget


@dataclass
class CLPConfig(AdapterConfig):
    dim: int = 768  # the text encoder's hidden size (CLIP ViT-L/14's 768 in SD 1.x)

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")


@dataclass
class WiCLPConfig(CLPConfig):
    window: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window must be an odd number >= 1 (tokens on each side of the centre), got {self.window}")


class CLP(Adapter):
    """``Linear(d, d)`` on every token state, initialised to the identity."""

    kind = "clp"
    family = "text_projection"
    config_class = CLPConfig

    def __init__(self, config: CLPConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.dim, config.dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(config.dim))
            self.proj.bias.zero_()

    def forward(self, states: Tensor) -> Tensor:  # (B, L, d) -> (B, L, d)
        return self.proj(states)


class WiCLP(Adapter):
    """``h + Conv1d(d, d, window)(h)`` over the tokens, the convolution zero-initialised (the identity at start)."""

    kind = "wiclp"
    family = "text_projection"
    config_class = WiCLPConfig

    def __init__(self, config: WiCLPConfig) -> None:
        super().__init__(config)
        self.conv = nn.Conv1d(config.dim, config.dim, config.window, padding=config.window // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, states: Tensor) -> Tensor:  # (B, L, d) -> (B, L, d)
        return states + self.conv(states.transpose(1, 2)).transpose(1, 2)


class TextProjectionPatch(Patch):
    """Project the UNet's text conditioning with ``projector`` (a CLP / WiCLP adapter).

    switch_off: project only while the timestep is above it (None: always). conditional: which rows of
    ``encoder_hidden_states`` are conditional: ``"auto"`` (with a pipeline doing classifier-free guidance,
    the second half; otherwise every row), ``"all"``, or ``"second_half"``.
    """

    CONDITIONAL = ("auto", "all", "second_half")
    hook_graphs = 1  # the projection runs in the UNet's pre-hook, compiled as its own graph

    def __init__(self, projector: nn.Module | str, *, switch_off: float | None = None, conditional: str = "auto") -> None:
        """``projector``: a CLP / WiCLP module, or its kind (``"clp"`` / ``"wiclp"``) for a fresh identity one sized
        from the UNet's ``cross_attention_dim`` when applied (then in ``self.projector``)."""
        if isinstance(projector, str) and projector not in ("clp", "wiclp"):
            raise ValueError(f"projector must be a module or one of 'clp', 'wiclp', got {projector!r}")
        if conditional not in self.CONDITIONAL:
            raise ValueError(f"conditional must be one of {self.CONDITIONAL}, got {conditional!r}")
        if switch_off is not None and switch_off < 0:
            raise ValueError(f"switch_off is a timestep >= 0 (or None), got {switch_off}")
        self.projector, self.switch_off, self.conditional = projector, switch_off, conditional

    def describe(self) -> str:
        kind = self.projector if isinstance(self.projector, str) else getattr(self.projector, "kind",
                                                                               type(self.projector).__name__)
        return f"TextProjectionPatch({kind}, switch_off={self.switch_off})"

    def _second_half(self, target: PatchTarget) -> bool:
        return target.guided if self.conditional == "auto" else self.conditional == "second_half"

    def hooks(self, target: PatchTarget) -> list[RemovableHandle]:
        width = getattr(getattr(target.model, "config", None), "cross_attention_dim", None)
        if isinstance(self.projector, str):
            from ..adapters import build_adapter

            if not isinstance(width, int):
                raise ValueError(f"{self.describe()} needs the text width: pass a projector module, or patch a UNet "
                                 "whose config has an integer cross_attention_dim")
            self.projector = build_adapter(self.projector, dim=width)
            self.projector.to(next(target.model.parameters()).device)
        dim = getattr(getattr(self.projector, "config", None), "dim", None)
        if isinstance(width, int) and isinstance(dim, int) and width != dim:
            raise ValueError(f"{self.describe()}: the projector maps {dim}-d text states, but "
                             f"{type(target.model).__name__} takes {width}-d ones (cross_attention_dim); use a projector "
                             "trained for this pipeline's text encoder")
        weight = next(iter(self.projector.parameters()))  # read its dtype per call (module.to() keeps the object)

        def gate(states: Tensor, timestep) -> Tensor:
            """(B,) bool: the rows whose timestep is above the switch-off (all rows without one)."""
            n = states.shape[0]
            t = None if timestep is None else torch.as_tensor(timestep, device=states.device).reshape(-1)
            if self.switch_off is None or t is None or t.numel() not in (1, n):
                return torch.ones(n, dtype=torch.bool, device=states.device)
            return (t > self.switch_off).expand(n)

        def transform(states: Tensor, timestep) -> Tensor:
            """Conditional text states (B, L, d) -> projected while t > switch_off (other patches' own states)."""
            projected = self.projector(states.to(weight.dtype)).to(states.dtype)
            return torch.where(gate(states, timestep)[:, None, None], projected, states)

        target.text_transforms.append(transform)

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            _, timestep, states = unet_call_inputs(args, kwargs)
            if not isinstance(states, Tensor) or states.dim() != 3:
                return None
            n = states.shape[0]
            start = n // 2 if self._second_half(target) else 0  # the conditional rows of a guided batch
            projected = transform(states[start:], _rows(timestep, start, n))
            return with_encoder_hidden_states(args, kwargs, torch.cat([states[:start], projected]))

        return [target.model.register_forward_pre_hook(hook, with_kwargs=True)]


def _rows(timestep: Any, start: int, n: int) -> Any:
    """The timesteps of rows ``start..n`` (a per-row timestep tensor is sliced; a scalar serves every row)."""
    if isinstance(timestep, Tensor) and timestep.dim() == 1 and timestep.numel() == n:
        return timestep[start:]
    return timestep


for _cls in (CLP, WiCLP):
    register_adapter(_cls)
