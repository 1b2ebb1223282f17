"""Progress of a merge in bytes read: a tqdm bar (a widget in notebooks) and events a panel can follow; and the
point where a merge asked to stop (a set ``cancel`` event) stops: after the tensor in hand, before the next."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

from nbmerge.errors import MergeCancelled


@dataclass(frozen=True)
class ProgressEvent:
    """``phase`` is a stage name or "merge", ``done``/``total`` then count input bytes over all passes; or
    "adapt" (a module-building method's training), ``done``/``total`` then count steps."""

    phase: str
    done: int
    total: int
    tensor: str = ""


class Progress:
    def __init__(self, total: int, show: bool, on_progress: Callable[[ProgressEvent], None] | None,
                 description: str, cancel: threading.Event | None = None,
                 around_callback: Callable[[], ContextManager] | None = None):
        """``around_callback()`` is entered around each call of ``on_progress`` (user code)."""
        self.total, self.done, self.phase_name = total, 0, ""
        self._on_progress = on_progress
        self._around_callback = around_callback or nullcontext
        self._cancel = cancel
        self._bar = None
        if show:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description,
                             leave=False, dynamic_ncols=True)

    def phase(self, name: str) -> None:
        check_cancel(self._cancel, f"before the {name} pass")
        self.phase_name = name
        if self._bar is not None:
            self._bar.set_postfix_str(name, refresh=False)
        self._emit("")

    def advance(self, nbytes: int, tensor: str) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
        self._emit(tensor)
        check_cancel(self._cancel, f"after tensor {tensor!r}")

    def _emit(self, tensor: str) -> None:
        if self._on_progress is not None:
            with self._around_callback():
                self._on_progress(ProgressEvent(self.phase_name, self.done, self.total, tensor))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def check_cancel(cancel: threading.Event | None, where: str) -> None:
    """Raise MergeCancelled when ``cancel`` is set (called between units of work: tensors, steps, points)."""
    if cancel is not None and cancel.is_set():
        raise MergeCancelled(f"stopped {where}; nothing was written")
