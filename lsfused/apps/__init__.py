"""Applications built on the optimizers, not part of the optimizer library: the demos (``demo``: digits, ``finetune``:
MiniLM-L6 on WordNet, ``textdata``: its data), ``diagnose`` and ``bench`` (the ``lsfused diagnose`` and ``lsfused
bench`` commands) and the baselines the benchmarks time (``baselines``)."""
