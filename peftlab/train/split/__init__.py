"""Split training (DLoRA, seed 002 §6.3): the frozen model in one process (:mod:`.server`,
:mod:`.backbone`), the data and the trainable PEFT modules in another (:mod:`.client`), exchanging
activations and gradients over HTTP (:mod:`.wire`, :mod:`.connection`). ``peftlab split serve|train``
(:mod:`.cli`); ``peftlab bench split`` measures bytes and time per step against local training.
"""
