"""Serving many adapters over one base model (issue 10): the inference engine.

The engine's modules:

* :mod:`~peftlab.serve.engine` -- the engine: the decode loop, admission, prefill and decode steps;
* :mod:`~peftlab.serve.requests` -- request, token event, result and the client's handle;
* :mod:`~peftlab.serve.errors` -- errors carrying their HTTP status;
* :mod:`~peftlab.serve.kv` -- the batched key/value cache with one row per request;
* :mod:`~peftlab.serve.bank` -- the adapter bank (LoRA family stacked once, gathered per row; dLoRA merging);
* :mod:`~peftlab.serve.cache` -- registered adapters on three tiers (device, host, disk), the loader thread;
* :mod:`~peftlab.serve.adapters` -- checking and reading adapter directories for serving;
* :mod:`~peftlab.serve.scheduler` -- the bounded queue, earliest deadline first, length groups;
* :mod:`~peftlab.serve.merge_policy` -- dLoRA's decision to merge one adapter;
* :mod:`~peftlab.serve.sampling` -- greedy and seeded top-p sampling;
* :mod:`~peftlab.serve.text` -- incremental text and stop strings;
* :mod:`~peftlab.serve.step_profile` -- one decode step timed with many adapters against the base.
"""
