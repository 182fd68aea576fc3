"""``make demo``: LoRA on the real MiniLM encoder, GLUE SST-2, on CPU in a few minutes.

Steps: dev accuracy of the base (random head) -> LoRA r=8 on query/value + a trainable head copy ->
train -> dev accuracy -> the adapter's report -> save, load into a fresh base, same predictions ->
merge, merged accuracy -> merge_and_unload, accuracy of the plain model.

    python -m peftlab.demo [--train-examples 8000] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import peftlab
from peftlab.train.data import head_module_names, load_task, make_loader
from peftlab.train.evaluation import evaluate_model
from peftlab.train.report import format_table, write_report
from peftlab.train.trainer import Trainer

METHOD = "lora[r=8,alpha=16,targets=query|value]"


def _predictions(model: torch.nn.Module, loader) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in loader])


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when every check passes."""
    ap = argparse.ArgumentParser(prog="python -m peftlab.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--train-examples", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    out = Path(args.out)

    train = load_task("glue_sst2", "train", limit=args.train_examples, seed=0)
    dev = load_task("glue_sst2", "eval")
    model, tokenizer = peftlab.zoo.load("minilm", task="classification", num_labels=2)
    train_loader = make_loader(train, tokenizer, batch_size=32, max_length=64, shuffle=True, seed=0)
    dev_loader = make_loader(dev, tokenizer, batch_size=64, max_length=64)
    print(f"MiniLM-L6 on SST-2: {len(train)} training sentences, {len(dev)} dev sentences; source {dev.source}")

    before = evaluate_model(model, dev_loader)["accuracy"]
    print(f"dev accuracy before training (random head): {before:.4f}")

    pm = peftlab.apply(model, METHOD, modules_to_save=head_module_names(model))
    trainer = Trainer(pm, train_loader, dev_loader, optimizer_groups=peftlab.param_groups(pm, lr=args.lr),
                      lr=args.lr, epochs=args.epochs, seed=0)
    result = trainer.train()
    after = result["eval"]["accuracy"]
    print(f"dev accuracy after training: {after:.4f}")

    report = pm.report()
    print(format_table([
        ("method", report["method"]),
        ("trainable params", f"{report['trainable_params']:,}"),
        ("changed params", f"{report['changed_params']:,}"),
        ("total params", f"{report['total_params']:,}"),
        ("trainable %", f"{report['trainable_percent']:.3f}"),
        ("ranks", f"{len(report['ranks'])} modules at r={sorted(set(report['ranks'].values()))}"),
        ("bytes on disk", f"{report['bytes_on_disk']:,}"),
        ("train time", f"{result['train_time_s']:.1f} s ({result['examples_per_s']:.1f} examples/s)"),
        ("peak memory", f"{result['peak_memory_bytes'] / 2**20:.0f} MiB above the loaded model"),
    ], title="adapter report"))

    pm.save(out / "adapter")
    expected = _predictions(pm, dev_loader)
    fresh, _ = peftlab.zoo.load("minilm", task="classification", num_labels=2)
    reloaded = peftlab.load(fresh, out / "adapter")
    got = _predictions(reloaded, dev_loader)
    same = bool(torch.equal(expected.argmax(-1), got.argmax(-1)))
    diff = (expected - got).abs().max().item()
    print(f"save -> load into a fresh base: same predictions: {same} (max |logit diff| {diff:.2e})")

    reloaded.merge()
    merged_acc = evaluate_model(reloaded, dev_loader)["accuracy"]
    reloaded.unmerge()
    base = reloaded.merge_and_unload()
    plain_acc = evaluate_model(base, dev_loader)["accuracy"]
    print(f"merged accuracy: {merged_acc:.4f}; after merge_and_unload (plain model, no hooks): {plain_acc:.4f}")

    ok = same and diff < 1e-4 and after > before and abs(merged_acc - after) < 2e-3 and abs(plain_acc - after) < 2e-3
    write_report(out, {"accuracy_before": before, "accuracy_after": after, "merged_accuracy": merged_acc,
                       "reload_same_predictions": same, "reload_max_logit_diff": diff, "adapter_report": report,
                       "train": {k: v for k, v in result.items() if k != "eval"},
                       "total_time_s": time.perf_counter() - started})
    print(f"demo {'passed' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s; files in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
