"""Serving many adapters over one base model (issue 10): the inference engine.

Modules: :mod:`~peftlab.serve.errors` (errors with their HTTP status), :mod:`~peftlab.serve.requests`
(request, token event, result, handle), :mod:`~peftlab.serve.engine` (the engine).
"""
