"""The one cancel contract of the pack's long loops (the tiled VAE's tiles and layers, tiled diffusion's batches).

A loop takes `should_cancel`, a callable it asks between two pieces of work, never inside one. The callable either
raises the host's own interrupt itself, which is what the nodes pass (`host_runtime.raise_if_interrupted` raises
ComfyUI's InterruptProcessingException, so the host reports its usual "interrupted" and nothing of ours is in the
way), or answers True, and then the loop raises `Cancelled` (pure callers, tests and benches, which have no host).

The remote client has its own `astria_errors.AstriaCancelled`: besides "cancelled" it must say whether a billable
prompt already exists on Astria (none, maybe, or which id), which a plain cancel cannot carry; the remote node
turns it into the host's interrupt too.
"""
from __future__ import annotations

from collections.abc import Callable

from .user_errors import shown_as_pack


@shown_as_pack
class Cancelled(Exception):
    """A loop's `should_cancel()` answered True between two pieces of work (see the module docstring)."""


def check_cancel(should_cancel: Callable[[], bool] | None, what: str) -> None:
    """Raise Cancelled when `should_cancel()` answers True (it may also raise the host's interrupt itself)."""
    if should_cancel is not None and should_cancel():
        raise Cancelled(f"{what} was cancelled.")
