"""Progress of a merge in bytes read: a tqdm bar (a widget in notebooks) and events a panel can follow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ProgressEvent:
    """``phase`` is a stage name or "merge"; ``done``/``total`` count input bytes over all passes."""

    phase: str
    done: int
    total: int
    tensor: str = ""


class Progress:
    def __init__(self, total: int, show: bool, on_progress: Callable[[ProgressEvent], None] | None,
                 description: str):
        self.total, self.done, self.phase_name = total, 0, ""
        self._on_progress = on_progress
        self._bar = None
        if show:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description,
                             leave=False, dynamic_ncols=True)

    def phase(self, name: str) -> None:
        self.phase_name = name
        if self._bar is not None:
            self._bar.set_postfix_str(name, refresh=False)
        self._emit("")

    def advance(self, nbytes: int, tensor: str) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
        self._emit(tensor)

    def _emit(self, tensor: str) -> None:
        if self._on_progress is not None:
            self._on_progress(ProgressEvent(self.phase_name, self.done, self.total, tensor))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
