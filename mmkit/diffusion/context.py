"""The denoising context: which timestep, step index and latent size the UNet is running right now.

A :class:`DenoiseContext` is filled by a forward pre-hook on the UNet (``register_forward_pre_hook``
with ``with_kwargs=True``), so no tensor or kwarg is smuggled through the model: processors that
were given the context read ``context.step`` / ``context.latent_size`` while the UNet runs.

How the step index is derived (``DenoiseContext.observe``):

1. **With a scheduler** (``patch(pipe, ...)`` hands over ``pipe.scheduler``): the step is the position
   of the current timestep in ``scheduler.timesteps``, the loop index of every diffusers pipeline.
   Schedules that repeat a timestep (PNDM's PLMS warm-up, Heun, DPM2) are disambiguated by the
   scheduler's own ``step_index`` when it has one that points at this timestep; otherwise by taking the
   next occurrence after the previous step when the same timestep comes twice in a row. For img2img
   (a truncated loop) the step is the position in the *full* schedule, i.e. it tracks the noise level.
2. **Without a scheduler** (a bare UNet), or when the timestep is not in ``scheduler.timesteps`` (the
   UNet called outside the pipeline loop): count distinct consecutive timesteps since the last reset.
   The same timestep again keeps the step (several UNet calls per step, e.g. separate guidance passes);
   a smaller one advances it by one; a larger one starts a new sampling run at step 0.
   :meth:`DenoiseContext.reset` forces step 0 for the next call.

Under ``torch.compile`` the pre-hook is traced into the UNet's graph, where reading the timestep's value
would be a host sync and a graph break. There the hook only records the latent size, and the step comes
from the scheduler, outside the graph: :meth:`DenoiseContext.drive` wraps ``scheduler.set_timesteps``
(step 0, or the scheduler's ``begin_index`` for img2img) and ``scheduler.step`` (the next step), which
``patch(pipe, ...)`` installs for the pipeline's scheduler; for a bare compiled UNet call
:meth:`DenoiseContext.set_step` yourself. Patches read what they need through :meth:`subscribe`, so the
compiled graph never reads the changing step number (which would recompile it at every step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class DenoiseContext:
    """Timestep, step index and latent size of the UNet forward in progress.

    Attributes (None until the first forward):
        timestep: the timestep as a float (the first one when a batch carries several).
        step: the denoising step index (see the module docstring for the rule).
        latent_size: (H, W) of the UNet's input sample, the grid every resolution is derived from.
        calls: UNet forwards seen since construction (eager forwards; a compiled graph does not count).

    ``scheduler``: an object with ``.timesteps`` (a diffusers scheduler), or a zero-argument callable
    returning one (so a pipeline whose scheduler is swapped later is still followed), or None.
    """

    def __init__(self, scheduler: Any = None) -> None:
        self._scheduler = scheduler
        self.timestep: float | None = None
        self.step: int | None = None
        self.latent_size: tuple[int, int] | None = None
        self.calls = 0
        self._position: int | None = None  # last position found in scheduler.timesteps
        self._listeners: list[Callable[[int | None], None]] = []

    # ------------------------------------------------------------------ who wants to know the step
    def subscribe(self, listener: Callable[[int | None], None]) -> Callable[[], None]:
        """Call ``listener(step)`` whenever the step changes (outside any compiled graph); returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def set_step(self, step: int | None) -> None:
        """Set the step index directly (a bare UNet under ``torch.compile``, or a custom sampling loop)."""
        if step is not None and (int(step) != step or step < 0):
            raise ValueError(f"step must be a non-negative integer or None, got {step!r}")
        changed = step != self.step
        self.step = None if step is None else int(step)
        if changed:
            for listener in list(self._listeners):
                listener(self.step)

    def drive(self, scheduler: Any) -> Callable[[], None]:
        """Follow ``scheduler``'s loop: ``set_timesteps`` starts at step 0 (or its ``begin_index``), each
        ``step()`` moves to the next. Wraps the two methods on the instance; returns the function that
        restores them."""
        wrapped = {}

        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            out = wrapped["set_timesteps"](*args, **kwargs)
            self._position = None
            self.timestep = None
            self.set_step(None)  # listeners hear that a run starts even when the previous one ended at its step 0
            self.set_step(int(getattr(scheduler, "begin_index", None) or 0))
            return out

        def step(*args: Any, **kwargs: Any) -> Any:
            out = wrapped["step"](*args, **kwargs)
            self.set_step((self.step or 0) + 1)
            return out

        for name, fn in (("set_timesteps", set_timesteps), ("step", step)):
            if callable(getattr(scheduler, name, None)):
                wrapped[name] = getattr(scheduler, name)
                setattr(scheduler, name, fn)

        def restore() -> None:
            for name in wrapped:
                if name in vars(scheduler):
                    delattr(scheduler, name)  # the class's own method shows again

        return restore

    # ------------------------------------------------------------------ state updates
    def reset(self) -> None:
        """Forget the previous timestep: the next forward is step 0 of a new run (counting rule)."""
        self.timestep = None
        self._position = None
        self.set_step(None)

    def observe(self, timestep: float | Tensor | None, latent_size: tuple[int, int] | None) -> None:
        """Record one UNet forward. Called by the pre-hook; call it yourself to drive processors directly.

        timestep: a number, or a 0-d / (B,) tensor (the first element is used); None leaves the step as is.
        latent_size: (H, W) of the sample, or None to keep the previous one.
        """
        if latent_size is not None:
            self.latent_size = (int(latent_size[0]), int(latent_size[1]))
        if torch.compiler.is_compiling():
            return  # no host reads inside a graph: the step comes from drive() / set_step()
        self.calls += 1
        if timestep is None:
            return
        t = _as_float(timestep)
        step = self._scheduler_step(t)
        if step is None:
            step = self._counted_step(t)
        else:
            self._position = step
        self.timestep = t
        self.set_step(step)

    def _counted_step(self, t: float) -> int:
        prev = self.timestep
        if prev is None or self.step is None or t > prev:
            return 0
        return self.step if t == prev else self.step + 1

    def _scheduler_step(self, t: float) -> int | None:
        scheduler = self.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return None
        ts = torch.as_tensor(timesteps).detach().flatten().to("cpu", torch.float64)
        hits = (ts - t).abs() <= 1e-4 * max(1.0, abs(t))
        candidates = hits.nonzero().flatten().tolist()
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        own = getattr(scheduler, "step_index", None)
        if isinstance(own, int) and own in candidates:
            return own
        prev = self._position
        if prev is not None and self.timestep == t:
            later = [p for p in candidates if p > prev]  # same timestep twice in a row: its next occurrence
            if later:
                return later[0]
        if prev is not None:
            onward = [p for p in candidates if p >= prev]
            if onward:
                return onward[0]
        return candidates[0]

    @property
    def scheduler(self) -> Any:
        s = self._scheduler
        return s() if callable(s) and not hasattr(s, "timesteps") else s

    # ------------------------------------------------------------------ hook
    def attach(self, unet: nn.Module) -> RemovableHandle:
        """Register the forward pre-hook on ``unet``; remove it with the returned handle.

        The sample is the first positional argument (or ``sample=`` / ``hidden_states=``); the timestep
        is the second positional argument or ``timestep=``, as in ``UNet2DConditionModel.forward``.
        """

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            sample, timestep, _ = unet_call_inputs(args, kwargs)
            if not _looks_like_timestep(timestep):
                timestep = None
            size = tuple(sample.shape[-2:]) if isinstance(sample, Tensor) and sample.dim() == 4 else None
            self.observe(timestep, size)
            return None

        return unet.register_forward_pre_hook(hook, with_kwargs=True)

    # ------------------------------------------------------------------ reading
    def require_latent_size(self, who: str) -> tuple[int, int]:
        if self.latent_size is None:
            raise RuntimeError(
                f"{who} needs the latent size of the current UNet forward, but this context has seen no "
                "forward yet. Run the patched UNet/pipeline, or call context.observe(timestep, (H, W)) "
                "before calling a patched block directly."
            )
        return self.latent_size

    def __repr__(self) -> str:
        return (
            f"DenoiseContext(step={self.step}, timestep={self.timestep}, latent_size={self.latent_size}, "
            f"calls={self.calls}, scheduler={type(self.scheduler).__name__ if self.scheduler is not None else None})"
        )


def unet_call_inputs(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    """(sample, timestep, encoder_hidden_states) of a ``UNet2DConditionModel.forward`` call as a forward pre-hook
    sees it: positional (sample, timestep, encoder_hidden_states, ...) or by keyword; None where absent."""
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
    states = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (args[2] if len(args) > 2 else None)
    return sample, timestep, states


def with_encoder_hidden_states(args: tuple, kwargs: dict, states: Tensor) -> tuple[tuple, dict]:
    """The pre-hook's return value that hands the UNet ``states`` as its ``encoder_hidden_states``."""
    if "encoder_hidden_states" in kwargs or len(args) <= 2:
        return args, {**kwargs, "encoder_hidden_states": states}
    return (*args[:2], states, *args[3:]), kwargs


def _looks_like_timestep(t: Any) -> bool:
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return True
    return isinstance(t, Tensor) and t.dim() <= 1 and t.numel() >= 1


def _as_float(t: float | Tensor) -> float:
    if isinstance(t, Tensor):
        return float(t if t.dim() == 0 else t.reshape(-1)[0])  # the one host read of an eager UNet forward
    return float(t)


__all__ = ["DenoiseContext", "unet_call_inputs", "with_encoder_hidden_states"]
