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
"""
