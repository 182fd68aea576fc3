"""``peftlab bench serve``: the serving load benchmark (after S-LoRA's evaluation).

Modules: :mod:`~.workload` (power-law adapters, Gamma arrivals, Alpaca lengths), :mod:`~.driver`
(open-loop replay of a trace, latency and throughput), :mod:`~.baselines` (Hugging Face PEFT switching
per request and PEFT's mixed batch), :mod:`~.cells` (one system x adapter count, measured),
:mod:`~.worker` (a cell in a fresh process), :mod:`~.report` (targets, table, plot), :mod:`~.cli`.
"""
