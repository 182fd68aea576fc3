"""Offsite-Tuning (Xiao et al. 2023; seed 002 §6.3): transfer learning without the full model.

The model owner cuts an *emulator* (:mod:`.emulate`): the bottom and top blocks are kept whole as
the *adapter*, the middle blocks are compressed by uniform layer drop (:mod:`.plan`, :mod:`.stack`)
and optionally distilled against the full model (:mod:`.distill`). The data owner trains the adapter
blocks on the emulator (``peftlab train --model EMU_DIR``) and returns them; the model owner plugs
them back into the full model (:mod:`.plug`). ``peftlab offsite emulate|plug`` (:mod:`.cli`).
"""
