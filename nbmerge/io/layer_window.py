"""A view of a model holding some of its layers, renumbered from 0: one slice of a layer stack.

Layers [start, end) of ``source`` appear as layers 0 .. end − start − 1; of the tensors outside the layer stack
only those ``keeps_outside(name)`` accepts appear (a stack takes its embeddings from its first slice and its
final norm and head from its last). Reads go to the underlying source, which its owner opens and closes.
"""

from __future__ import annotations

from typing import Callable

from nbmerge.errors import ModelInputError
from nbmerge.io.sources import ModelSource, SourceView
from nbmerge.method.tensor_names import count_layers, layer_index, with_layer


class LayerWindow(SourceView):
    def __init__(self, source: ModelSource, start: int, end: int, keeps_outside: Callable[[str], bool]):
        layers = count_layers(source.infos)
        if not 0 <= start < end <= layers:
            raise ModelInputError(f"{source.label}: layer_range [{start}, {end}] is not within its {layers} layers "
                                  f"(give 0 <= start < end <= {layers})")
        super().__init__(source)
        self.start, self.end = start, end
        self._inner: dict[str, str] = {}
        for name in source.infos:
            index = layer_index(name)
            if index is None and keeps_outside(name):
                self._inner[name] = name
            elif index is not None and start <= index < end:
                self._inner[with_layer(name, index - start)] = name
        self.infos = {name: source.infos[inner] for name, inner in self._inner.items()}

    def inner(self, name: str) -> str:
        return self._inner[name]
