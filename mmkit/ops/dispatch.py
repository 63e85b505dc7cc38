"""Backend registry and selection.

Which backend runs a call, in order of precedence:
1. ``attention(..., backend="name")``;
2. the innermost ``with mmkit.ops.attention_backend("name"):`` block;
3. the environment variable ``MMKIT_ATTENTION_BACKEND``;
4. automatic: the first of ``AUTO_ORDER`` that accepts the call.

A backend chosen by 1-3 that cannot run the call raises :class:`BackendUnavailable` listing why, and
what every other backend would have done; there is no silent fallback. Automatic choice is logged at
DEBUG level with the kernel that ran.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator

import torch

from ..registry import Registry
from .backends.base import AttentionBackend, AttentionCall

logger = logging.getLogger("mmkit.ops")

ENV_VAR = "MMKIT_ATTENTION_BACKEND"
AUTO_ORDER = ("sdpa", "eager")

BACKENDS: Registry[AttentionBackend] = Registry("attention backend")
_CONTEXT: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmkit_attention_backend", default=None)


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run this call; the message says why."""


def register_backend(backend: AttentionBackend, *, replace: bool = False) -> None:
    """Add a backend (an :class:`AttentionBackend` instance) under ``backend.name``."""
    _ensure_builtins()
    BACKENDS.register(backend.name, backend, replace=replace)


def backends() -> dict[str, AttentionBackend]:
    """All registered backends by name."""
    _ensure_builtins()
    return dict(BACKENDS.items())


def get_backend(name: str) -> AttentionBackend:
    _ensure_builtins()
    return BACKENDS.get(name)


@contextlib.contextmanager
def attention_backend(name: str | None) -> Iterator[None]:
    """Run every ``attention()`` call inside the block on backend ``name`` (None = automatic)."""
    if name is not None:
        get_backend(name)  # fail early on a typo
    token = _CONTEXT.set(name)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def requested_backend(explicit: str | None) -> tuple[str | None, str]:
    """The backend asked for and where the request came from."""
    if explicit is not None:
        return explicit, "argument"
    ctx = _CONTEXT.get()
    if ctx is not None:
        return ctx, "context"
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "auto":
        return env, f"${ENV_VAR}"
    return None, "auto"


def automatic_backend() -> str | None:
    """The backend a call without ``backend=`` gets when nothing more specific applies: the innermost
    ``attention_backend`` block, else ``$MMKIT_ATTENTION_BACKEND``, else ``AUTO_ORDER[0]`` (sdpa)."""
    name = _CONTEXT.get()
    if name is None:
        name = _env_backend()
        if not name or name == "auto":
            return AUTO_ORDER[0]
        name = name.strip()
    return name


# os.environ.get re-encodes the key on every call (~1 us, a tenth of the per-call budget of attention()):
# read CPython's underlying dict with the key encoded once, as os.environ itself does.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else ENV_VAR


def _env_backend() -> str | None:
    if _ENV_DATA is None:
        return os.environ.get(ENV_VAR)
    raw = _ENV_DATA.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def report(call: AttentionCall) -> list[tuple[str, str]]:
    """For every registered backend: (name, "ok: <kernel>" or the reasons it cannot run the call)."""
    rows = []
    for name, be in backends().items():
        why = be.reasons(call)
        rows.append((name, f"ok: {be.kernel(call)}" if not why else "; ".join(why)))
    return rows


def select(call: AttentionCall, explicit: str | None) -> AttentionBackend:
    _ensure_builtins()
    name, source = requested_backend(explicit)
    if name is not None:
        be = get_backend(name)
        why = be.reasons(call)
        if why:
            others = "; ".join(f"{n}: {r}" for n, r in report(call) if n != name)
            raise BackendUnavailable(
                f"attention backend {name!r} (from {source}) cannot run {call.describe()}: "
                f"{'; '.join(why)}. Other backends - {others}"
            )
        return be
    for candidate in AUTO_ORDER:
        be = BACKENDS.get(candidate)
        if not be.reasons(call):
            if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
                logger.debug("attention %s -> %s (%s)", call.describe(), be.name, be.kernel(call))
            return be
    raise BackendUnavailable(f"no attention backend can run {call.describe()}: {report(call)}")


def _ensure_builtins() -> None:
    global _BUILTINS_REGISTERED
    if _BUILTINS_REGISTERED:
        return
    _BUILTINS_REGISTERED = True
    from .backends.compiled import CompiledBackend
    from .backends.eager import EagerBackend
    from .backends.sdpa import SdpaBackend
    from .backends.triton import TritonBackend

    for be in (EagerBackend(), SdpaBackend(), CompiledBackend(), TritonBackend()):
        BACKENDS.register(be.name, be)


_BUILTINS_REGISTERED = False
