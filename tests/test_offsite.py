"""Offsite-Tuning (``peftlab offsite emulate|plug``): the emulator's plan and layer counts, adapter
blocks bit-identical to the original's, distillation that moves only the middle blocks, a plug that
writes exactly the trained tensors back, and a plugged MiniLM that beats the untrained one on SST-2."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

import peftlab
from conftest import one_thread, randomize_adapter
from peftlab.cli import main
from peftlab.train.data import load_file, load_task, make_loader
from peftlab.train.evaluation import evaluate_model
from peftlab.train.offsite.distill import distill, hidden_before, normalized_mse
from peftlab.train.offsite.emulate import MANIFEST
from peftlab.train.offsite.plan import PlanError, plan_emulator, uniform_layers
from peftlab.train.offsite.plug import PlugError, changed_tensors, plug_into
from peftlab.train.offsite.stack import block_stack, cut_emulator
from peftlab.zoo import tiny_model

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
STACK = "bert.encoder.layer"
TRAIN = ["--text-cols", "text", "--label-col", "label", "--max-steps", "16", "--batch-size", "16",
         "--max-length", "16", "--lr", "1e-3", "--no-progress"]
GOOD = ["good", "great", "wonderful", "excellent", "lovely", "brilliant", "delightful", "superb"]
BAD = ["bad", "awful", "terrible", "boring", "dreadful", "poor", "dull", "horrible"]
TEMPLATES = ["the movie was {}", "a {} film", "what a {} story", "the acting is {}", "{} from start to end",
             "i found it {}", "truly {} work", "the plot felt {}"]


def sentiment_file(path: Path, rows: int, seed: int) -> Path:
    """A small learnable task: template sentences with a positive or a negative word (CSV: text,label)."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(rows):
        label = rng.choice(["positive", "negative"])
        lines.append(f"{rng.choice(TEMPLATES).format(rng.choice(GOOD if label == 'positive' else BAD))},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _block_tensors(model: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in block_stack(model)[1][index].state_dict().items()}


def _six_layer_llama() -> torch.nn.Module:
    base = tiny_model("llama", "causal-lm")
    base.config.num_hidden_layers = 6
    torch.manual_seed(0)
    return type(base)(base.config).eval()


def _save_trained_adapter(model: torch.nn.Module, method: str, path: Path) -> None:
    """Save an adapter of ``method`` on ``model`` moved away from its init (as training would), then unload it."""
    pm = peftlab.apply(model, method)
    randomize_adapter(pm, std=0.05)
    pm.save(path)
    pm.unload()


# -- the plan --------------------------------------------------------------------------------------

def test_uniform_choice_keeps_both_ends_as_the_paper_does() -> None:
    assert uniform_layers(8, 3) == [0, 4, 7]  # round(i * 7 / 2)
    assert uniform_layers(4, 4) == [0, 1, 2, 3] and uniform_layers(5, 1) == [0]
    plan = plan_emulator(30, 2, 2, emulator_layers=6)  # SmolLM2's 30 blocks
    assert plan.middle == (2, 7, 12, 17, 22, 27) and plan.emulator_layers == 10
    assert plan.kept == [0, 1, 2, 7, 12, 17, 22, 27, 28, 29] and plan.adapter_blocks == [0, 1, 8, 9]
    assert plan_emulator(6, 1, 1, drop_ratio=0.5).kept == [0, 1, 4, 5]
    assert type(plan).from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize(("counts", "options", "says"), [
    ((6, 3, 3), {"drop_ratio": 0.5}, "leave no middle block"),
    ((6, 1, 0), {"drop_ratio": 0.5}, "--keep-top >= 1"),
    ((6, 1, 1), {}, "exactly one of --drop-ratio"),
    ((6, 1, 1), {"drop_ratio": 0.5, "emulator_layers": 2}, "exactly one of --drop-ratio"),
    ((6, 1, 1), {"emulator_layers": 5}, "between 1 and 4"),
    ((6, 1, 1), {"drop_ratio": 1.0}, "[0, 1)"),
])
def test_a_plan_that_cannot_be_built_says_what_would(counts, options, says) -> None:
    with pytest.raises(PlanError, match=re.escape(says)):
        plan_emulator(*counts, **options)


# -- the emulator ------------------------------------------------------------------------------------

def test_emulator_of_a_decoder_has_the_declared_blocks_renumbered_and_runs_with_a_cache() -> None:
    full = _six_layer_llama()
    plan = plan_emulator(6, 1, 2, emulator_layers=2)
    emulator = cut_emulator(full, plan)
    assert plan.kept == [0, 1, 3, 4, 5] and emulator.config.num_hidden_layers == 5
    assert full.config.num_hidden_layers == 6 and len(block_stack(full)[1]) == 6  # the source is untouched
    for j, i in enumerate(plan.kept):
        assert block_stack(emulator)[1][j].self_attn.layer_idx == j
        ours, theirs = _block_tensors(emulator, j), _block_tensors(full, i)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    out = emulator.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)


def test_emulate_command_writes_a_model_directory_with_the_declared_counts(offsite_run: dict) -> None:
    emulator_dir, full = offsite_run["emulator"], offsite_run["full_base"]
    manifest = json.loads((emulator_dir / MANIFEST).read_text())
    assert manifest["plan"]["kept"] == [0, 1, 4, 5] and manifest["plan"]["adapter_blocks"] == [0, 3]
    assert manifest["adapter_method"] == "freeze_layers[blocks=layer.0|layer.3]"
    emulator, _ = peftlab.zoo.load(str(emulator_dir))
    assert emulator.config.num_hidden_layers == 4 and len(block_stack(emulator)[1]) == 4
    for j, i in enumerate([0, 1, 4, 5]):  # adapter blocks (0, 3) and the kept middle blocks, bit-identical
        ours, theirs = _block_tensors(emulator, j), _block_tensors(full, i)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert torch.equal(emulator.embeddings.word_embeddings.weight, full.embeddings.word_embeddings.weight)


def test_distillation_moves_only_the_middle_blocks_towards_the_full_model() -> None:
    full, tokenizer = peftlab.zoo.load("minilm")
    plan = plan_emulator(6, 1, 1, emulator_layers=1)
    emulator = cut_emulator(full, plan)
    texts = [" ".join(t) for t in load_task("sst2", "train", limit=8, seed=3).texts]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=24))

    def gap() -> float:
        with torch.no_grad():
            return float(normalized_mse(hidden_before(full, 5, batch), hidden_before(emulator, 2, batch),
                                        batch["attention_mask"]))

    before = gap()
    report = distill(emulator, full, plan, tokenizer, texts, steps=6, batch_size=8, max_length=24, lr=3e-4,
                     progress=False)
    assert gap() < 0.8 * before and len(report["loss_curve"]) == 6
    for j, i in ((0, 0), (2, 5)):  # the adapter blocks are still the original's, bit for bit
        ours, theirs = _block_tensors(emulator, j), _block_tensors(full, i)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    middle, source = _block_tensors(emulator, 1), _block_tensors(full, 1)
    assert any(not torch.equal(middle[k], source[k]) for k in source)
    assert all(p.requires_grad for p in emulator.parameters())  # the flags it had (a loaded model: all True)


# -- emulate, train on the emulator, plug: the command line end to end -------------------------------

@pytest.fixture(scope="module")
def offsite_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("offsite")
    emulator, trained, plugged = root / "emu", root / "trained", root / "plugged"
    train, evals = sentiment_file(root / "train.csv", 256, seed=0), sentiment_file(root / "eval.csv", 96, seed=1)
    assert main(["offsite", "emulate", "--model", "minilm", "--keep-bottom", "1", "--keep-top", "1",
                 "--drop-ratio", "0.5", "--out", str(emulator)]) == 0
    assert main(["train", "--model", str(emulator), "--method", "freeze_layers[blocks=layer.0|layer.3]",
                 "--data", str(train), "--eval-data", str(evals), "--out", str(trained), *TRAIN]) == 0
    assert main(["offsite", "plug", "--model", "minilm", "--adapter", str(trained), "--out", str(plugged)]) == 0
    full_base, _ = peftlab.zoo.load("minilm")
    return {"emulator": emulator, "trained": trained, "plugged": plugged, "full_base": full_base, "eval": evals}


def test_plug_writes_exactly_the_trained_tensors_and_nothing_else(offsite_run: dict) -> None:
    original, _ = peftlab.zoo.load("minilm", task="classification", num_labels=2)
    plugged, _ = peftlab.zoo.load(str(offsite_run["plugged"]), task="classification", num_labels=2)
    emulator, _ = peftlab.zoo.load(str(offsite_run["emulator"]), task="classification", num_labels=2)
    trained = changed_tensors(emulator, offsite_run["trained"])  # the emulator with its adapter merged
    written = json.loads((offsite_run["plugged"] / "offsite_plug.json").read_text())["plugged"]
    assert set(written) == set(trained)
    blocks = {int(m.group(1)) for k in written.values() if (m := re.match(rf"{STACK}\.(\d+)\.", k))}
    assert blocks == {0, 5} and {"classifier.weight", "classifier.bias"} <= set(written.values())
    back = {full_key: emu_key for emu_key, full_key in written.items()}
    assert len([k for k in back if k.startswith(f"{STACK}.5.")]) == len(_block_tensors(original, 5))
    for key, value in plugged.state_dict().items():
        expected = trained[back[key]] if key in back else original.state_dict()[key]
        assert torch.equal(value, expected), key


def test_plugged_model_beats_the_untrained_full_model(offsite_run: dict) -> None:
    report = json.loads((offsite_run["trained"] / "report.json").read_text())
    _, tokenizer = peftlab.zoo.load("minilm")
    evals = load_file(offsite_run["eval"], ["text"], "label", label_names=report["label_names"])
    loader = make_loader(evals, tokenizer, 32, 16)
    untrained, _ = peftlab.zoo.load("minilm", task="classification", num_labels=2)
    plugged, _ = peftlab.zoo.load(str(offsite_run["plugged"]), task="classification", num_labels=2)
    before, after = evaluate_model(untrained, loader)["accuracy"], evaluate_model(plugged, loader)["accuracy"]
    assert report["metric_after"] > report["metric_before"] + 0.1  # it learned on the emulator
    print(f"accuracy (96 held-out sentences): untrained {before:.3f}, emulator {report['metric_before']:.3f} -> "
          f"{report['metric_after']:.3f}, plugged {after:.3f}")
    assert after > before + 0.1 and after > 0.6, (before, after)


# -- refusals ------------------------------------------------------------------------------------------

def test_plug_refuses_an_adapter_that_changed_a_compressed_middle_block(tmp_path: Path) -> None:
    full = _six_layer_llama()
    plan = plan_emulator(6, 1, 1, emulator_layers=2)
    emulator = cut_emulator(full, plan)
    _save_trained_adapter(emulator, "lora[r=2,targets=q_proj]", tmp_path / "adapter")
    with pytest.raises(PlugError, match=r"emulator block 1: a compressed middle block \(the adapter blocks are \[0, 3\]\)"):
        plug_into(full, emulator, tmp_path / "adapter", plan)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), _six_layer_llama().state_dict().values()))


def test_plug_maps_a_lora_on_the_adapter_blocks_of_a_decoder(tmp_path: Path) -> None:
    full = _six_layer_llama()
    plan = plan_emulator(6, 1, 2, emulator_layers=1)  # emulator blocks 0 | 1 | 2, 3 = full 0 | 1 | 4, 5
    emulator = cut_emulator(full, plan)
    _save_trained_adapter(emulator, "lora[r=2,targets=q_proj|v_proj,layers=0|2|3]", tmp_path / "adapter")
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mapping = plug_into(full, cut_emulator(full, plan), tmp_path / "adapter", plan)
    assert sorted(mapping.values()) == sorted(f"model.layers.{i}.self_attn.{m}_proj.weight"
                                              for i in (0, 4, 5) for m in "qv")
    reference = cut_emulator(full, plan)  # the emulator cut from the plugged model = the trained emulator
    trained = peftlab.load(cut_emulator(_six_layer_llama(), plan), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reference(ids).logits, trained(ids).logits, atol=1e-5)


def test_offsite_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["offsite", "plug", "--model", "minilm", "--adapter", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "has no report.json; pass --kind" in capsys.readouterr().err
