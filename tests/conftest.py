"""Shared helpers for the test suite: tiny models, output extraction, adapter randomisation."""

from __future__ import annotations

import os

import pytest
import torch
from transformers.utils import logging as transformers_logging

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

# transformers makes its library logger's StreamHandler on first use, holding the sys.stderr of
# that moment. Made inside a test that uses capsys, it would hold that test's capture stream, which
# pytest closes afterwards: every later transformers warning then prints "--- Logging error ---"
# into whatever stderr a later test checks. Made here, it holds the session's stderr.
transformers_logging.get_logger("transformers")


def one_thread():
    """Run a module's tests with one intra-op thread, then restore the count (wrap it as a fixture)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def first_output(out) -> torch.Tensor:
    """The main tensor of a model output (logits, or the last hidden state)."""
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key) and getattr(out, key) is not None:
            return getattr(out, key)
    return out[0] if isinstance(out, (tuple, list)) else out


def randomize_adapter(pm, adapter: str = "default", std: float = 0.1, seed: int = 0) -> None:
    """Move every trainable adapter parameter away from its init (so B ≠ 0, vectors ≠ 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_modules[adapter].parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


@pytest.fixture
def tiny():
    from peftlab.zoo import tiny_batch, tiny_model

    def make(kind: str, task: str = "base", seed: int = 0):
        model = tiny_model(kind, task=task, seed=seed)
        return model, tiny_batch(model, batch=3, seq=8)

    return make


# -- helpers shared by the per-method test files -------------------------------------------------------
#: Token ids for the tiny text models (above their special ids).
IDS = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(3))


def tiny_net(kind: str, task: str = "base", noisy_biases: bool = False):
    """A tiny model from :func:`peftlab.zoo.tiny_model`; ``noisy_biases`` makes its biases nonzero
    (Hugging Face inits them to 0), so that methods that scale or shift biases show an effect."""
    from peftlab.zoo import tiny_model

    model = tiny_model(kind, task=task)
    return add_noise_to_biases(model) if noisy_biases else model


def add_noise_to_biases(model, std: float = 0.1):
    """Add N(0, std²) noise to every parameter named ``*bias`` of ``model`` (seeded); returns it."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def main_output(model, ids: torch.Tensor = IDS, **kw) -> torch.Tensor:
    """``first_output`` of ``model(input_ids=ids, **kw)`` without autograd."""
    with torch.no_grad():
        return first_output(model(input_ids=ids, **kw))


def assert_mixed_batch_equals_per_adapter(pm, names: list, batch: dict | None = None, atol: float = 1e-5) -> None:
    """Row i of a mixed batch routed by ``names`` (None: no adapter) equals row i of the whole batch
    run with adapter ``names[i]`` alone. ``batch`` defaults to ``{"input_ids": IDS}``."""
    batch = batch if batch is not None else {"input_ids": IDS}

    def run(**kw):
        with torch.no_grad():
            return first_output(pm(**batch, **kw))

    mixed = run(adapter_names=names)
    for i, name in enumerate(names):
        if name is None:
            with pm.disable_adapters():
                ref = run()
        else:
            pm.set_adapter(name)
            ref = run()
        assert (mixed[i] - ref[i]).abs().max().item() <= atol, (i, name)


def spy_on_routed(monkeypatch, delta_cls) -> list:
    """Record, for each call of ``delta_cls.forward_routed``, whether it computed the mixed batch
    itself (True) or handed it back to the dispatcher's one-sub-batch-per-adapter loop (False)."""
    calls: list[bool] = []
    original = delta_cls.forward_routed.__func__

    def spy(cls, *args):
        result = original(cls, *args)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(delta_cls, "forward_routed", classmethod(spy))
    return calls


def assert_gathered_mixed_batch(monkeypatch, delta_cls, model, a, b, names=("a", "b", None), batch=None,
                                std: float = 0.1) -> None:
    """Adapters "a" and "b" (configs ``a`` and ``b``) on ``model``, moved away from init differently:
    a mixed batch routed by ``names`` equals each row's adapter run alone, and every
    ``delta_cls.forward_routed`` call computed it itself (no one-sub-batch-per-adapter fallback)."""
    import peftlab

    calls = spy_on_routed(monkeypatch, delta_cls)
    pm = peftlab.apply(model, a, adapter_name="a")
    pm.add_adapter("b", b)
    randomize_adapter(pm, "a", seed=1, std=std)
    randomize_adapter(pm, "b", seed=2, std=std)
    assert_mixed_batch_equals_per_adapter(pm, list(names), batch)
    assert calls and all(calls)


# -- the command line on a tiny model (test_cli.py, test_train_*.py) ---------------------------------

def cli_error(argv: list[str], capsys) -> str:
    """Run ``peftlab *argv`` in this process, expecting a user error (exit status 2); returns its
    line ``peftlab: error: ...`` (the last of stderr)."""
    from peftlab.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("peftlab: error: ") and "Traceback" not in err
    return err


@pytest.fixture(scope="session")
def tiny_run_args(tmp_path_factory) -> list[str]:
    """Arguments for a one-step ``peftlab train`` on a tiny random BERT directory and a 16-row TSV."""
    from transformers import BertTokenizer

    from peftlab.zoo import tiny_model

    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "bert"
    tiny_model("bert").save_pretrained(model_dir)
    words = ["good", "bad", "fine", "awful", "movie", "plot"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(model_dir)
    rows = [f"{w} {n}\t{int(w in ('good', 'fine'))}" for w in words[:4] for n in words[4:]] * 2
    (root / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return ["train", "--model", str(model_dir), "--data", str(root / "train.tsv"), "--eval-data",
            str(root / "train.tsv"), "--text-cols", "sentence", "--label-col", "label", "--max-steps", "1",
            "--batch-size", "8", "--max-length", "8", "--no-progress", "--device", "cpu"]
