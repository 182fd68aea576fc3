"""The benchmark: peftlab and Hugging Face PEFT measured side by side, under identical conditions.

``peftlab bench lora`` (see :mod:`peftlab.bench.cli`) times LoRA / DoRA training steps, inference
(merged and unmerged) and mixed-adapter batches on the zoo's real models, writes a JSON report and a
plot, and prints a table with the performance targets as pass/fail columns.

Modules:

* :mod:`~peftlab.bench.cli` -- the command line (``main(argv)``);
* :mod:`~peftlab.bench.lora` -- the three sections (train, infer, mixed) and their orchestration;
* :mod:`~peftlab.bench.models` -- which model, which batch, which loss;
* :mod:`~peftlab.bench.libs` -- the same adapter set up in peftlab and in PEFT;
* :mod:`~peftlab.bench.measure` -- timing, peak memory and fresh-subprocess isolation;
* :mod:`~peftlab.bench.worker` -- the entry point of a fresh subprocess;
* :mod:`~peftlab.bench.targets` -- the issue's targets, evaluated on the results;
* :mod:`~peftlab.bench.table` -- the printed table and the plot.

``peftlab bench methods`` (the standard benchmark: every registered method under one budget):

* :mod:`~peftlab.bench.standard_cli` -- its command line;
* :mod:`~peftlab.bench.standard` -- presets, the plan, results.jsonl, re-runs;
* :mod:`~peftlab.bench.standard_run` -- one run (data, model, method, training, record);
* :mod:`~peftlab.bench.workers` -- the pool of worker processes;
* :mod:`~peftlab.bench.standard_report` -- report.md and the plots;
* :mod:`~peftlab.bench.smoke` -- tiny models, hash tokenizer and synthetic task of the smoke preset.

``peftlab bench multi`` (:mod:`~peftlab.bench.multi`): several adapters trained in one joint
``peftlab train`` run against one run per adapter (wall time, CPU time, peak memory).
"""
