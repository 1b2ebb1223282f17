"""The built-in evaluation task pools: the five MiniLM text tasks of ``nbmerge.workbench.models.zoo``, in two sizes.

``minilm-tiny`` builds in a few minutes on 2 cores (tests, CI); ``minilm-full`` is the benchmark's profile.
Options: ``seed`` (the zoo's splits and fine-tuning), ``cache_dir``, ``progress``.
"""

import nbmerge


def _pool_builder(profile: str):
    def build(seed: int = 0, cache_dir=None, progress: bool = True):
        from nbmerge.workbench.models.zoo import build_zoo

        return build_zoo(profile, seed=seed, cache_dir=cache_dir, progress=progress).pool

    return build


@nbmerge.hookimpl
def register_task_pools(register):
    register("minilm-tiny", _pool_builder("tiny"),
             "all-MiniLM-L6-v2 fine-tuned on 5 text tasks (sentiment, subjectivity, debate party, chat topic, "
             "chat language); short texts, 40 steps")
    register("minilm-full", _pool_builder("full"),
             "the same 5 tasks at benchmark size: 64-token texts, 150 fine-tuning steps per task")
