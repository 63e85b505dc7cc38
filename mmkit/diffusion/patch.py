"""Reversible add-ons for diffusers models: ``patch(pipe_or_unet, *patches) -> PatchHandle``.

A patch changes a model only through two mechanisms, both undone exactly by ``handle.remove()``:

- **attention processors keyed by module path**, the keys of diffusers' ``unet.attn_processors``
  (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor``). The previous processor
  *objects* are saved and put back, so after removal the UNet computes bit for bit what it computed
  before;
- **torch hooks**, kept as their ``RemovableHandle``: one forward pre-hook per handle feeds the
  :class:`~mmkit.diffusion.context.DenoiseContext` (timestep, step index, latent size), and a patch
  may register more.

Layers are chosen by :meth:`PatchTarget.select`: a regex searched in the processor path, the kind of
attention (``"self"`` / ``"cross"``, from ``Attention.is_cross_attention``) and the block's downsample
factor, read from the UNet's structure (``down_blocks`` / ``mid_block`` / ``up_blocks`` and which of them
own a down- or upsampler), never by counting calls. Patches compose when they claim disjoint layers;
two patches claiming one processor is an error naming both and the layer, in one ``patch()`` call or
across live handles on the same model.

    with patch(pipe, AgentSD()):
        images = pipe(prompt, num_inference_steps=50).images
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from .context import DenoiseContext

KINDS = ("any", "self", "cross")


class Patch:
    """Base class of a reversible add-on. Subclasses override one or both of:

    - :meth:`processors` - ``{processor path: processor}`` to install (the claimed layers);
    - :meth:`hooks` - extra torch hooks; return their ``RemovableHandle`` objects.

    Neither may change the model in any other way: :class:`PatchHandle` undoes exactly these two.

    ``hook_graphs``: graphs a patch's own hooks add under ``torch.compile`` (a forward pre-hook that computes
    on tensors is compiled as a frame of its own, next to the UNet's graph); constant over steps.
    """

    hook_graphs = 0

    def processors(self, target: PatchTarget) -> dict[str, Any]:
        return {}

    def hooks(self, target: PatchTarget) -> list[RemovableHandle]:
        return []

    def describe(self) -> str:
        """Short name used in error messages, e.g. ``AgentSD(max_downsample=1)``."""
        return type(self).__name__

    def check_prompts(self, prompts: list[str]) -> None:
        """Refuse prompts this patch cannot act on (NeTI: none names its concept); called by the samplers."""

    def __repr__(self) -> str:
        return self.describe()


@dataclass(eq=False)
class PatchTarget:
    """What a patch sees while it is applied.

    model: the UNet (or any module holding diffusers ``Attention`` layers); scheduler: the pipeline's
    scheduler or None; context: the :class:`DenoiseContext` fed by this handle's pre-hook.
    text_transforms: ``fn(states (B, L, d), timestep) -> states`` that patches of the same ``patch()`` call
    apply to the conditional text states (CLP / WiCLP register theirs), so a patch that builds text states of
    its own (NeTI's per-layer contexts) can pass them through the same projection.
    guided: whether the UNet batch is ``[unconditional, conditional]`` (the source pipeline's
    ``do_classifier_free_guidance``), refreshed outside any compiled graph at patch time and at every step.
    """

    model: nn.Module
    context: DenoiseContext
    source: Any = None
    text_transforms: list = field(default_factory=list)
    guided: bool = False

    def refresh_guided(self, step: Any = None) -> None:
        self.guided = bool(getattr(self.source, "do_classifier_free_guidance", False))

    @property
    def scheduler(self) -> Any:
        return self.context.scheduler

    def layers(self) -> dict[str, nn.Module]:
        """``{processor path: Attention module}`` in module order (the keys of ``attn_processors``)."""
        return attention_layers(self.model)

    def downsample(self, path: str) -> int | None:
        """Downsample factor of the block holding ``path`` (1 = full latent resolution), None if unknown."""
        return downsample_factors(self.model).get(_block_of(path))

    def select(
        self, *, pattern: str | None = None, kind: str = "any", max_downsample: int | None = None
    ) -> list[str]:
        """Processor paths matching every given criterion (see :func:`select_layers`)."""
        return select_layers(self.model, pattern=pattern, kind=kind, max_downsample=max_downsample)


class ProcessorPatch(Patch):
    """Install ``make()`` (a fresh processor per layer) on the selected layers.

    ``ProcessorPatch(MmkitAttnProcessor)`` runs every attention layer through ``mmkit.ops.attention``;
    ``ProcessorPatch(lambda: MmkitAttnProcessor(backend="eager"), kind="cross")`` only cross-attention.
    Selection arguments as in :func:`select_layers`; at least one layer must match.
    """

    def __init__(
        self,
        make: Callable[[], Any],
        *,
        pattern: str | None = None,
        kind: str = "any",
        max_downsample: int | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(make):
            raise TypeError(f"ProcessorPatch needs a callable that builds a processor, got {type(make).__name__}")
        self.make = make
        self.pattern, self.kind, self.max_downsample = pattern, kind, max_downsample
        self.name = name

    def processors(self, target: PatchTarget) -> dict[str, Any]:
        paths = target.select(pattern=self.pattern, kind=self.kind, max_downsample=self.max_downsample)
        if not paths:
            raise ValueError(
                f"{self.describe()} selects no attention layer of {type(target.model).__name__} "
                f"(pattern={self.pattern!r}, kind={self.kind!r}, max_downsample={self.max_downsample}); "
                f"its layers are e.g. {_examples(target.layers())}"
            )
        return {path: self.make() for path in paths}

    def describe(self) -> str:
        if self.name:
            return self.name
        what = getattr(self.make, "__name__", type(self.make).__name__)
        sel = [f"pattern={self.pattern!r}"] if self.pattern else []
        sel += [f"kind={self.kind!r}"] if self.kind != "any" else []
        sel += [f"max_downsample={self.max_downsample}"] if self.max_downsample is not None else []
        return f"ProcessorPatch({', '.join([what, *sel])})"


# ---------------------------------------------------------------------- layer discovery and selection
def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{"<module path>.processor": module}`` for every module with a diffusers attention processor."""
    return {
        f"{name}.processor": module
        for name, module in model.named_modules()
        if name and hasattr(module, "get_processor") and hasattr(module, "set_processor")
    }


def downsample_factors(model: nn.Module) -> dict[str, int]:
    """``{block path: downsample factor}`` for a UNet built like ``UNet2DConditionModel``.

    Read from the structure: ``down_blocks[i]`` sees the latent downsampled by 2 for every earlier down
    block that owns ``downsamplers``; ``mid_block`` the full count; ``up_blocks`` undo one factor of 2
    per ``upsamplers``. Empty for a model without ``down_blocks`` / ``up_blocks``.
    """
    factors: dict[str, int] = {}
    down = getattr(model, "down_blocks", None)
    up = getattr(model, "up_blocks", None)
    if down is None or up is None:
        return factors
    f = 1
    for i, block in enumerate(down):
        factors[f"down_blocks.{i}"] = f
        if getattr(block, "downsamplers", None) is not None:
            f *= 2
    if getattr(model, "mid_block", None) is not None:
        factors["mid_block"] = f
    for i, block in enumerate(up):
        factors[f"up_blocks.{i}"] = f
        if getattr(block, "upsamplers", None) is not None:
            f = max(1, f // 2)
    return factors


def select_layers(
    model: nn.Module, *, pattern: str | None = None, kind: str = "any", max_downsample: int | None = None
) -> list[str]:
    """Processor paths of ``model`` that match all given criteria, in module order.

    pattern: regex searched (``re.search``) in the processor path, e.g. ``r"attn1"`` or ``r"^up_blocks\\.3"``.
    kind: ``"self"`` (``not attn.is_cross_attention``), ``"cross"`` or ``"any"``.
    max_downsample: keep layers whose block's downsample factor (:func:`downsample_factors`) is at most
        this (1 = only the full-resolution blocks). Needs a UNet-like model.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    regex = re.compile(pattern) if pattern is not None else None
    factors = downsample_factors(model) if max_downsample is not None else {}
    if max_downsample is not None and not factors:
        raise ValueError(
            f"max_downsample={max_downsample} needs a UNet with down_blocks/up_blocks to read block resolutions "
            f"from, but {type(model).__name__} has none; select layers with pattern= instead"
        )
    chosen = []
    for path, module in attention_layers(model).items():
        if regex is not None and not regex.search(path):
            continue
        cross = bool(getattr(module, "is_cross_attention", False))
        if (kind == "self" and cross) or (kind == "cross" and not cross):
            continue
        if max_downsample is not None:
            f = factors.get(_block_of(path))
            if f is None or f > max_downsample:
                continue
        chosen.append(path)
    return chosen


def _block_of(path: str) -> str:
    parts = path.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def _examples(layers: Iterable[str], n: int = 3) -> str:
    names = list(layers)
    shown = ", ".join(repr(p) for p in names[:n])
    return f"{shown}{' ...' if len(names) > n else ''} ({len(names)} in all)"


# ---------------------------------------------------------------------- handles
class _Live:
    """What is applied to one model right now: claimed processor paths and live patch objects."""

    def __init__(self) -> None:
        self.claims: dict[str, tuple[Patch, PatchHandle]] = {}
        self.patches: dict[int, tuple[Patch, PatchHandle]] = {}


# Weak, so a dropped UNet frees its entry.
_LIVE: weakref.WeakKeyDictionary[nn.Module, _Live] = weakref.WeakKeyDictionary()


class PatchHandle:
    """The live application of one or more patches; undo it with :meth:`remove` or a ``with`` block.

    Attributes: ``model`` (the patched UNet), ``context`` (its :class:`DenoiseContext`), ``patches``,
    ``layers`` (``{processor path: patch}``), ``active``.
    """

    def __init__(self, model: nn.Module, context: DenoiseContext, source: Any = None) -> None:
        self.model = model
        self.context = context
        self.source = source
        self.patches: tuple[Patch, ...] = ()
        self.layers: dict[str, Patch] = {}
        self.active = False
        self._installed: dict[str, tuple[nn.Module, Any, Any]] = {}  # path -> (module, previous, ours)
        self._hooks: list[RemovableHandle] = []
        self._restore_scheduler: Any = None  # undoes context.drive(pipe.scheduler)

    def _apply(self, patches: tuple[Patch, ...]) -> None:
        for p in patches:
            if not isinstance(p, Patch):
                raise TypeError(
                    f"patch() takes Patch objects (AgentSD(...), ToMe(...), ProcessorPatch(...)); got {type(p).__name__}"
                )
        live = _LIVE.setdefault(self.model, _Live())
        claims = live.claims
        seen: dict[int, Patch] = {}
        for p in patches:
            if id(p) in seen:
                raise ValueError(f"{p.describe()} was passed to patch() twice; pass each patch once")
            if id(p) in live.patches:
                raise ValueError(
                    f"{p.describe()} is already applied to this {type(self.model).__name__}; remove that handle "
                    "first (handle.remove() or leave its `with` block) or build a second patch object"
                )
            seen[id(p)] = p

        target = PatchTarget(self.model, self.context, self.source)
        target.refresh_guided()
        layers = target.layers()
        planned: dict[str, tuple[Patch, Any]] = {}
        for p in patches:
            for path, proc in p.processors(target).items():
                if path not in layers:
                    raise ValueError(
                        f"{p.describe()} wants to set processor {path!r}, which {type(self.model).__name__} does not "
                        f"have; its attention processors are e.g. {_examples(layers)}"
                    )
                other = planned.get(path, (None,))[0] or claims.get(path, (None,))[0]
                if other is not None:
                    raise ValueError(
                        f"patches {other.describe()} and {p.describe()} both claim the attention processor {path!r}; "
                        "patches must claim disjoint layers - narrow one of them (pattern=, kind=, max_downsample=) "
                        "or apply them one after the other"
                    )
                planned[path] = (p, proc)

        # Nothing has been touched yet; from here on, undo whatever was done if anything fails.
        self.active = True
        try:
            self._hooks.append(self.context.attach(self.model))
            scheduler = getattr(self.source, "scheduler", None) if self.source is not None else None
            if scheduler is not None:
                self._restore_scheduler = self.context.drive(scheduler)
            self.context.subscribe(target.refresh_guided)  # set_timesteps comes after the pipeline's guidance choice
            for path, (p, proc) in planned.items():
                module = layers[path]
                self.layers[path] = p
                self._installed[path] = (module, module.get_processor(), proc)
                module.set_processor(proc)
                claims[path] = (p, self)
            self.patches = tuple(patches)
            for p in patches:
                live.patches[id(p)] = (p, self)
            for p in patches:
                self._hooks.extend(p.hooks(target))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> bool:
        """Restore the previous processor objects and remove the hooks. Returns False if already removed.

        A processor that was replaced by someone else while the patch was live is left in place (with a
        warning) rather than overwritten.
        """
        if not self.active:
            return False
        live = _LIVE.get(self.model) or _Live()
        claims = live.claims
        for path, (module, previous, ours) in self._installed.items():
            if module.get_processor() is ours:
                module.set_processor(previous)
            else:
                warnings.warn(
                    f"{path} no longer holds the processor {self.layers[path].describe()} installed; leaving "
                    f"{type(module.get_processor()).__name__} there instead of restoring {type(previous).__name__}",
                    stacklevel=2,
                )
            if claims.get(path, (None, None))[1] is self:
                del claims[path]
        for p in self.patches:
            if live.patches.get(id(p), (None, None))[1] is self:
                del live.patches[id(p)]
        for h in self._hooks:
            h.remove()
        if self._restore_scheduler is not None:
            self._restore_scheduler()
            self._restore_scheduler = None
        self._installed.clear()
        self._hooks.clear()
        self.active = False
        return True

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        names = ", ".join(p.describe() for p in self.patches)
        return f"PatchHandle({names}; {len(self.layers)} layers; {state})"


def patch(pipe_or_module: Any, *patches: Patch) -> PatchHandle:
    """Apply ``patches`` to a diffusers pipeline (its ``.unet``, following ``.scheduler``) or to a UNet /
    any module holding diffusers attention layers. Returns a :class:`PatchHandle`, also a context manager.

    All-or-nothing: if a patch fails to apply (overlap, unknown layer, bad config), nothing is changed.
    """
    model, source = _resolve(pipe_or_module)
    if source is not None:
        context = DenoiseContext(lambda: getattr(source, "scheduler", None))
    else:
        context = DenoiseContext()
    handle = PatchHandle(model, context, source)
    handle._apply(tuple(patches))
    return handle


def _resolve(obj: Any) -> tuple[nn.Module, Any]:
    unet = getattr(obj, "unet", None)
    if isinstance(unet, nn.Module):
        return _uncompiled(unet), obj
    if isinstance(obj, nn.Module):
        obj = _uncompiled(obj)
        if not attention_layers(obj):
            raise ValueError(
                f"{type(obj).__name__} holds no diffusers attention layer (module with get_processor/set_processor); "
                "pass a UNet2DConditionModel, a pipeline with .unet, or a module containing diffusers Attention"
            )
        return obj, None
    raise TypeError(
        f"patch() takes a diffusers pipeline (with .unet) or an nn.Module, got {type(obj).__name__}"
    )


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (patched there, the compiled graph picks the patch up)."""
    return getattr(module, "_orig_mod", module)


__all__ = [
    "Patch",
    "PatchHandle",
    "PatchTarget",
    "ProcessorPatch",
    "attention_layers",
    "downsample_factors",
    "patch",
    "select_layers",
]
