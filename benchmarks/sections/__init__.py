"""The benchmark's sections, one module each, run in this order by run_benchmarks.py.

``setup.prepare`` builds the run's Context (workload files, adapter merge);
``setup.load_resident`` loads both models once; then (e) ``logits``, (a)+(c) ``graph_stage``,
(d) ``analysis``, (b) ``reload`` and ``fast_dtype`` (bf16 attribution, batch-size sweep).
Each measuring section returns its raw numbers, results.json's "numbers"; only ``fast_dtype``
fills a results object instead, so that a failure part-way keeps what it measured.
"""
