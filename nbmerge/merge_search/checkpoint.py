"""A search's checkpoint: its configuration and every finished generation, as JSON, replaced atomically.

An interrupted search (Stop, Ctrl-C, a killed driver) resumes from its last finished generation: the optimizer is
rebuilt from the same seed and told the recorded generations again, which puts it in exactly the state it had
(CMA-ES's sampling is a function of its seed and of what it was told), so a resumed search proposes the same
candidates an uninterrupted one would. A checkpoint of another configuration is refused, not overwritten.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nbmerge.errors import ParameterError
from nbmerge.io.text_files import write_text_atomically

FORMAT = "nbmerge-search/1"


@dataclass
class Generation:
    genomes: list[list[float]]
    fitness: list[float]
    merge_seconds: list[float]
    eval_seconds: list[float]
    errors: list[str | None] = field(default_factory=list)
    wall_seconds: float = 0.0  # the generation's wall time (its candidates ran in parallel on the workers)
    start: bool = False  # the search's starting point, scored before the first generation (not told to CMA-ES)

    @property
    def best(self) -> float:
        return max(self.fitness)

    @property
    def mean(self) -> float:
        return sum(self.fitness) / len(self.fitness)


def load(path: Path | None, config: dict) -> list[Generation]:
    """The finished generations of the search ``config`` at ``path`` (none when there is no checkpoint yet)."""
    if path is None or not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ParameterError(f"search: checkpoint {path}: cannot read it as JSON ({exc}); move it away to start "
                             f"afresh") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ParameterError(f"search: {path} is not a search checkpoint (format {FORMAT})")
    if data.get("config") != json.loads(json.dumps(config)):
        changed = sorted(k for k in set(config) | set(data.get("config", {}))
                         if data.get("config", {}).get(k) != json.loads(json.dumps(config)).get(k))
        raise ParameterError(f"search: checkpoint {path} is of another search ({', '.join(changed)} differ); give "
                             f"another checkpoint path or the same settings")
    try:
        return [Generation(**entry) for entry in data["generations"]]
    except (KeyError, TypeError) as exc:
        raise ParameterError(f"search: checkpoint {path} is damaged ({exc})") from None


def save(path: Path | None, config: dict, generations: list[Generation]) -> None:
    """Write the checkpoint next to its final name and move it into place (a kill leaves the old one whole)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps({"format": FORMAT, "config": config,
                                            "generations": [asdict(g) for g in generations]}, indent=1))
