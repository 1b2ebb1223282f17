"""The built-in evaluation task pools, each in two sizes: ``-tiny`` builds in a few minutes on 2 cores (tests, CI),
``-full`` is the benchmark's profile. Options: ``seed`` (the zoo's splits and fine-tuning), ``cache_dir``,
``progress``.

- ``minilm-*``: all-MiniLM-L6-v2 fine-tuned on five text tasks (``nbmerge.workbench.models.zoo``);
- ``ta8-text`` (and ``ta8-text-tiny``): all-MiniLM-L6-v2 fine-tuned on eight text tasks against frozen zero-shot
  heads shared by every model, FusionBench's CLIP TA8 protocol (``nbmerge.workbench.models.ta8zoo``);
- ``vision-*``, the robustness pool: EfficientNet-Lite0 fine-tuned on eight image tasks of different domains and
  label spaces (``nbmerge.workbench.models.vision_zoo``), where static merges lose much more;
- ``smollm2-chat``: a causal LM, SmolLM2-135M-Instruct and two chat fine-tunes of it
  (``nbmerge.workbench.models.lmpool``): perplexity per topic slice and multiple-choice prompt accuracy.
"""

import nbmerge


def _pool_builder(zoo: str, profile: str):
    def build(seed: int = 0, cache_dir=None, progress: bool = True):
        if zoo == "minilm":
            from nbmerge.workbench.models.zoo import build_zoo as build_the_zoo
        elif zoo == "ta8":
            from nbmerge.workbench.models.ta8zoo import build_ta8_zoo as build_the_zoo
        else:
            from nbmerge.workbench.models.vision_zoo import build_vision_zoo as build_the_zoo

        return build_the_zoo(profile, seed=seed, cache_dir=cache_dir, progress=progress).pool

    return build


def _smollm2_chat(seed: int = 0, cache_dir=None, progress: bool = True, texts_per_domain: int = 16):
    from nbmerge.workbench.models.lmpool import smollm2_chat_pool

    return smollm2_chat_pool(texts_per_domain, seed=seed, cache_dir=cache_dir, progress=progress)


@nbmerge.hookimpl
def register_task_pools(register):
    register("minilm-tiny", _pool_builder("minilm", "tiny"),
             "all-MiniLM-L6-v2 fine-tuned on 5 text tasks (sentiment, subjectivity, debate party, chat topic, "
             "chat language); short texts, 40 steps")
    register("minilm-full", _pool_builder("minilm", "full"),
             "the same 5 tasks at benchmark size: 64-token texts, 150 fine-tuning steps per task")
    register("ta8-text", _pool_builder("ta8", "full"),
             "all-MiniLM-L6-v2 fine-tuned on 8 text tasks (BBC topic, WordNet noun and verb supersense, language "
             "of random words, fortune category, sentiment, chat topic, debate party) against frozen zero-shot "
             "heads; 500 steps per task")
    register("ta8-text-tiny", _pool_builder("ta8", "tiny"),
             "the same 8 tasks and heads at CI size: a few examples per class, 16 tokens, 3 steps")
    register("vision-tiny", _pool_builder("vision", "tiny"),
             "EfficientNet-Lite0 fine-tuned on 8 image tasks (MNIST, Fashion-MNIST, animal silhouettes, 8×8 digits, "
             "emoji groups, emoji skin tones, letters, writing systems); 24 images per class, 25 steps")
    register("vision-full", _pool_builder("vision", "full"),
             "the same 8 tasks at benchmark size: 120 images per class, 300 fine-tuning steps per task")
    register("smollm2-chat", _smollm2_chat,
             "SmolLM2-135M-Instruct and two chat fine-tunes of it (sft, aligned): perplexity on held-out chat pairs "
             "of each fine-tune's topics, accuracy on general-knowledge prompts")
