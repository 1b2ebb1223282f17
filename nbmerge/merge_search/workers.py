"""Where candidates are scored: in this process, or on Ray actors — a local cluster started here (``ray.init()``)
or a running one reached by its address (``ray start --head`` elsewhere). The same calls run either way; each
actor is a ``CandidateEvaluator`` holding the pool and the models in its own memory."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from nbmerge.errors import ParameterError
from nbmerge.merge_search.evaluator import CandidateEvaluator, EvaluatorSpec

OBJECT_STORE_BYTES = 256 * 2**20  # candidates and scores are small; a local cluster needs no more


class Workers:
    def __init__(self, spec: EvaluatorSpec, count: int, address: str | None = None):
        if count < 0:
            raise ParameterError(f"search: workers must be 0 (this process) or more, got {count}")
        self.count, self._started_ray, self._actors, self._local = count, False, None, None
        if count == 0 and address is None:
            self._local = CandidateEvaluator(spec)
            return
        try:
            import ray
        except ImportError:
            raise ParameterError("search: workers > 0 run on Ray; install nbmerge[search] (or pass workers=0)") from None
        if not ray.is_initialized():
            options = dict(address=address, include_dashboard=False, log_to_driver=False)
            if address is None:
                options.update(num_cpus=max(count, 1), object_store_memory=OBJECT_STORE_BYTES)
            try:
                ray.init(**options)
            except ConnectionError as exc:
                raise ParameterError(f"search: cannot reach the Ray cluster at {address!r} ({exc}); a cluster with "
                                     f"token authentication needs its token in RAY_AUTH_TOKEN (and "
                                     f"RAY_AUTH_MODE=token)") from None
            self._started_ray = True
        evaluator = ray.remote(num_cpus=1)(CandidateEvaluator)
        actors = max(count, 1)
        # each actor one share of the cores (a local cluster: this machine's; a remote one: its own default)
        threads = max(1, (os.cpu_count() or 1) // actors) if address is None else 0
        self._actors = [evaluator.remote(replace(spec, threads=threads)) for _ in range(actors)]

    def score_all(self, candidates: list[dict]) -> list[tuple]:
        """(fitness, merge s, evaluation s, error) per candidate, in order."""
        if self._local is not None:
            return [self._local.score(params) for params in candidates]
        from ray.util import ActorPool

        return list(ActorPool(self._actors).map(lambda actor, params: actor.score.remote(params), candidates))

    def call(self, name: str, *args: Any) -> Any:
        """One evaluator's ``name(*args)`` (e.g. a final test score)."""
        if self._local is not None:
            return getattr(self._local, name)(*args)
        import ray

        return ray.get(getattr(self._actors[0], name).remote(*args))

    def close(self) -> None:
        if self._actors is None:
            return
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._started_ray:
            ray.shutdown()
