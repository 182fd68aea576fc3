"""Several processes, in this process (train/distributed.py, train/fsdp.py): the FSDP2 units a
PeftModel is sharded into (each delta in its block's unit), the adapter gathered whole for saving,
the same-model check, and what happens without a launcher. The runs with real processes are in
test_distributed_runs.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import peftlab
from peftlab.cli import main
from peftlab.train.distributed import ProcessesError, check_same_model, model_checksums, start_processes
from peftlab.train.fsdp import FsdpError, block_units, fsdp_units, full_adapters, shard_with_blocks
from peftlab.zoo import tiny_batch, tiny_model


@pytest.fixture
def one_process_group(tmp_path: Path) -> Iterator[object]:
    """A real gloo process group of one process, and its device mesh; left after the test."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _bert_with(method: str) -> peftlab.PeftModel:
    model = tiny_model("bert", "classification")
    torch.manual_seed(0)
    return peftlab.apply(model, method, modules_to_save=["classifier"])


def _unit_of(units: list[list[str]]) -> dict[str, int]:
    return {name: i for i, names in enumerate(units) for name in names}


def test_each_delta_is_sharded_in_the_unit_of_its_block(one_process_group: object) -> None:
    pm = _bert_with("lora[r=4,targets=query|value]")
    batch = {**tiny_batch(pm.model, batch=4), "labels": torch.tensor([0, 1, 1, 0])}
    expected = pm(**batch).logits.detach()
    shard_with_blocks(pm, one_process_group)
    unit = _unit_of(fsdp_units(pm))
    assert len(set(unit.values())) == 3  # two blocks, and the root
    for _, module_name, delta in pm.placements["default"]:
        delta_units = {unit[n] for n, p in pm.named_parameters() if any(p is q for q in delta.parameters())}
        if module_name == "classifier":  # outside every block: the copied head stays in the root unit
            assert delta_units == {unit["model.bert.embeddings.word_embeddings.weight"]}
            continue
        block = ".".join(module_name.split(".")[:4])  # bert.encoder.layer.N
        assert delta_units == {unit[f"model.{block}.attention.output.dense.weight"]}
    assert torch.allclose(pm(**batch).logits, expected, atol=1e-6)  # sharding changes no output


def test_generate_after_a_training_step_under_fsdp_equals_the_unsharded_model(one_process_group: object) -> None:
    # After backward the root unit (embeddings, LM head) is resharded, and generate() calls the
    # base's forward, not pm's: FSDP must treat pm.generate as a forward to gather the root.
    model = tiny_model("llama", "causal-lm")
    torch.manual_seed(0)
    pm = peftlab.apply(model, "lora[r=4]")
    batch = tiny_batch(model, batch=2)
    expected = pm.generate(**batch, max_new_tokens=4, do_sample=False)
    shard_with_blocks(pm, one_process_group)
    pm(**batch, labels=batch["input_ids"]).loss.backward()
    assert torch.equal(pm.generate(**batch, max_new_tokens=4, do_sample=False), expected)


def test_deltas_sharing_a_parameter_across_blocks_stay_in_the_root_unit(one_process_group: object) -> None:
    pm = _bert_with("compacter[n=2,reduction_factor=8]")  # one PHM rule for every layer's adapter
    units = block_units(pm)
    assert all(len(modules) == 1 for modules in units.values())  # blocks alone, no delta beside them
    shard_with_blocks(pm, one_process_group)
    unit = _unit_of(fsdp_units(pm))
    root = unit["model.bert.embeddings.word_embeddings.weight"]
    adapter_params = [n for n, p in pm.named_parameters() if n.startswith("adapter_modules.")]
    assert adapter_params and all(unit[n] == root for n in adapter_params)


def test_full_adapters_gathers_whole_tensors_and_puts_the_shards_back(one_process_group: object) -> None:
    from torch.distributed.tensor import DTensor

    pm = _bert_with("lora[r=4,targets=query|value]")
    before = {k: v.clone() for k, v in pm.adapter_tensors().items()}
    shard_with_blocks(pm, one_process_group)
    with full_adapters(pm):
        inside = pm.adapter_tensors()
        assert not any(isinstance(v, DTensor) for v in inside.values())
        assert inside.keys() == before.keys() and all(torch.equal(inside[k], before[k]) for k in before)
    trainable = [p for p in pm.adapter_modules.parameters() if p.requires_grad]
    assert trainable and all(isinstance(p, DTensor) for p in trainable)


def test_fsdp_refuses_a_model_without_blocks_and_methods_that_act_during_training() -> None:
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(FsdpError, match="no blocks"):
        block_units(peftlab.apply(plain, "lora[r=2,targets=0|2]"))
    with pytest.raises(FsdpError, match=r"adapter\(s\) \['default'\] use a method that acts during training"):
        shard_with_blocks(_bert_with("adalora[init_r=4,target_r=2,total_step=10]"), mesh=None)


def test_processes_holding_different_models_are_refused() -> None:
    pm = _bert_with("lora[r=4]")
    mine = model_checksums(pm)
    check_same_model([mine, mine])
    with torch.no_grad():
        next(p for p in pm.model.parameters()).add_(1e-3)
    with pytest.raises(ProcessesError, match="process 1 holds a different base model"):
        check_same_model([mine, model_checksums(pm)])


def test_without_a_launcher_training_is_one_process_and_fsdp_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    assert start_processes("cpu").world_size == 1
    with pytest.raises(SystemExit):
        main(["train", "--task", "sst2", "--out", "unused", "--fsdp", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "--fsdp shards the model over several processes: launch it with torchrun" in err


def test_an_fsdp_run_refuses_checkpoint_options() -> None:
    import argparse

    from peftlab.train.distributed import ProcessGroup, check_fsdp_options

    fsdp = ProcessGroup(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), fsdp=True)
    ddp = ProcessGroup(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), fsdp=False)
    asked = argparse.Namespace(save_every=None, eval_every=2, resume=None)
    check_fsdp_options(ddp, asked)
    with pytest.raises(ProcessesError, match="--eval-every: an FSDP run writes no checkpoints"):
        check_fsdp_options(fsdp, asked)
    check_fsdp_options(fsdp, argparse.Namespace(save_every=None, eval_every=None, resume=None))
