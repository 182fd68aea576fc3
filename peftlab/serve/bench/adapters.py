"""The benchmark's adapters: n LoRA adapters with distinct random weights, saved once in PEFT's file
format and shared by every cell (the engine and PEFT load the same files)."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from peftlab.bench.libs import randomize_same
from peftlab.serve.bench.cells import adapter_names, load_model

METHOD = "lora[r=8,alpha=16,targets=q_proj|v_proj]"
STAMP = "bench_serve_adapters.json"


def make_adapters(model_name: str, n: int, root: Path, seed: int = 0, method: str = METHOD,
                  progress: bool = True) -> list[str]:
    """Directories of ``n`` adapters (``root/a0000`` ...) of ``method`` on ``model_name``, each with
    its own seeded random A and B. Adapters already in ``root`` from the same model, method and seed
    are kept (a stamp file records them), so a larger run reuses a smaller one's files."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = {"model": model_name, "method": method, "seed": seed}
    stamp_file = root / STAMP
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) != stamp:
        raise ValueError(f"{root} holds adapters of {json.loads(stamp_file.read_text())}, not {stamp}: use another "
                         "--adapter-dir")
    stamp_file.write_text(json.dumps(stamp))
    names = adapter_names(n)
    missing = [i for i, name in enumerate(names) if not (root / name / "adapter_model.safetensors").is_file()]
    if missing:
        import peftlab

        model, _ = load_model(model_name, "cpu")
        pm = peftlab.apply(model, method)
        for i in tqdm(missing, desc="saving adapters", unit="adapter", disable=not progress, leave=False):
            randomize_same({"peftlab": pm}, ["default"], seed=seed * 1_000_003 + i)
            pm.save(str(root / names[i]))
    return [str(root / name) for name in names]
