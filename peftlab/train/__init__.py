"""Training: task data (``data``), metrics (``metrics``), the training loop (``trainer``), peak
memory measurement (``memory``) and the ``peftlab`` command line (``cli``).

Submodules are imported on demand so that ``peftlab info`` and ``--help`` stay quick.
"""
