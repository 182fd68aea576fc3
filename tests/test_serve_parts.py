"""The engine's pure parts on their own: dLoRA's merge policy, sampling, stop strings and incremental
text, PetS's length groups, the bank's layout, and the bank against the library's mixed batch."""

from __future__ import annotations

import pytest
import torch
from conftest import one_thread
from serve_helpers import save_adapter

import peftlab
from peftlab.serve.adapters import read_adapter_dir
from peftlab.serve.bank import AdapterBank, BankLayout
from peftlab.serve.merge_policy import MergePolicy
from peftlab.serve.sampling import next_tokens, uniforms
from peftlab.serve.scheduler import Waiting, length_groups
from peftlab.serve.text import TextTracker
from peftlab.zoo import tiny_model

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


# -- merge policy ---------------------------------------------------------------------------------
def test_merge_policy_merges_a_dominant_adapter_with_hysteresis():
    p = MergePolicy(merge_share=0.8, unmerge_share=0.5, min_requests=4)
    assert p.decide({"a": 3}, None) is None  # too few requests
    assert p.decide({"a": 8, "b": 2}, None) == "a"  # 80 %
    assert p.decide({"a": 7, "b": 3}, None) is None  # 70 % < merge_share
    assert p.decide({"a": 7, "b": 3}, "a") == "a"  # merged stays while >= unmerge_share
    assert p.decide({"a": 4, "b": 6}, "a") is None  # 40 %: unmerge
    assert p.decide({"a": 1, "b": 9}, "a") == "b"  # the mix moved to another adapter
    assert p.decide({None: 9, "a": 1}, None) is None  # the base model is never merged
    assert p.decide({"a": 9, None: 1}, None) == "a"
    assert p.decide({"a": 9, "b": 1}, None, mergeable={"b"}) is None  # a cannot be merged (not on the device)
    assert p.decide({}, None) is None


@pytest.mark.parametrize("kw", [{"merge_share": 0.5, "unmerge_share": 0.6}, {"merge_share": 1.5},
                                {"unmerge_share": 0.0}, {"min_requests": 0}])
def test_merge_policy_refuses_inconsistent_thresholds(kw):
    with pytest.raises(ValueError, match="MergePolicy"):
        MergePolicy(**kw)


# -- sampling -------------------------------------------------------------------------------------------
def test_uniforms_are_reproducible_spread_and_independent_of_the_batch():
    seeds = torch.tensor([1, 1, 2, 2**40 + 3])
    steps = torch.tensor([0, 1, 0, 0])
    u = uniforms(seeds, steps)
    assert torch.equal(u, uniforms(seeds, steps))
    assert torch.equal(u[1:2], uniforms(seeds[1:2], steps[1:2]))  # a row's number does not depend on the others
    assert len(set(u.tolist())) == 4
    many = uniforms(torch.full((20000,), 7), torch.arange(20000))
    assert 0.0 <= float(many.min()) and float(many.max()) < 1.0
    hist = torch.histc(many, bins=10, min=0, max=1) / 20000
    assert float((hist - 0.1).abs().max()) < 0.01


def test_next_tokens_greedy_temperature_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]] * 3))
    n = 6000
    rows = logits.repeat(n // 3, 1)
    t = torch.tensor([0.0, 1.0, 1.0] * (n // 3))
    p = torch.tensor([1.0, 1.0, 0.7] * (n // 3))
    tokens = next_tokens(rows, t, p, torch.arange(n), torch.zeros(n, dtype=torch.long))
    greedy, full, nucleus = tokens[0::3], tokens[1::3], tokens[2::3]
    assert torch.equal(greedy, torch.zeros_like(greedy))  # argmax
    freq = torch.bincount(full, minlength=4).float() / full.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.03)
    # top_p 0.7: the smallest set reaching 0.7 is {0, 1}, renormalized to 5/8, 3/8
    freq = torch.bincount(nucleus, minlength=4).float() / nucleus.numel()
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03)


# -- text ---------------------------------------------------------------------------------------------
class WordTokenizer:
    """Token i is the i-th word below (a space before every word but the first of the sequence)."""

    words = ["<pad>", "<s>", "</s>", "hello", "wor", "ld", "!", "END", "ma", "rk"]

    def decode(self, ids, skip_special_tokens=True):
        parts = [self.words[i] for i in ids if not (skip_special_tokens and i < 3)]
        return "".join(parts)


def test_text_tracker_holds_back_a_possible_stop_string_and_cuts_at_it():
    t = TextTracker(WordTokenizer(), [1, 3], stop=["ENDmark", "!!"])
    assert t.add(4) == "wor"
    assert t.add(5) == "ld"
    assert t.add(6) == ""  # "!" could start "!!"
    assert t.add(3) == "!hello"  # it did not
    assert t.add(7) == ""  # "END" could start "ENDmark"
    assert t.add(8) == ""
    assert t.add(9) == "" and t.stopped  # "ENDmark": the output ends before it
    assert t.released == "world!hello"
    t = TextTracker(WordTokenizer(), [3], stop=["ENDx"])
    assert [t.add(i) for i in (4, 7)] == ["wor", ""]
    assert t.finish() == "END" and t.released == "worEND"  # at the end, what was held comes out


# -- scheduling -------------------------------------------------------------------------------------
def test_length_groups_put_similar_prompts_together():
    items = [Waiting(None, None, None, 0.0, 0.0, n) for n in (3, 50, 4, 52, 5, 200, 60)]
    groups = [[w.prompt_len for w in g] for g in length_groups(items)]
    assert groups == [[3, 4, 5], [50, 52, 60], [200]]


# -- the bank -------------------------------------------------------------------------------------------
def test_bank_layout_packs_offsets_and_compares_with_order():
    A, B = torch.randn(2, 5), torch.randn(3, 2)
    layout = BankLayout(4, {"m": (5, 3), "n": (7, 2)})
    flat = layout.pack({"m": (A, B)}, torch.float32)
    assert flat.numel() == layout.size >= 4 * (5 + 3 + 7 + 2)
    got_a, got_b = layout.unpack(flat)["m"]
    assert torch.equal(got_a[:2], A) and torch.equal(got_b[:, :2], B) and not got_a[2:].any()
    assert not layout.unpack(flat)["n"][0].any()
    assert layout.covers({"m": (A, B)}) and not layout.covers({"z": (A, B)})
    assert layout == BankLayout(4, {"m": (5, 3), "n": (7, 2)}) != BankLayout(4, {"n": (7, 2), "m": (5, 3)})


def test_bank_equals_the_librarys_mixed_batch_for_any_mix_of_ranks(tmp_path):
    specs = {"a": "lora[r=2,targets=q_proj|v_proj]", "b": "lora[r=7,alpha=3,targets=q_proj|o_proj|gate_proj]",
             "c": "lora[r=4,rslora=true,targets=v_proj]"}
    model = tiny_model("llama", "causal-lm")
    reads = {n: read_adapter_dir(save_adapter(model, s, tmp_path / n, seed=i), model) for i, (n, s) in enumerate(specs.items())}
    bank = AdapterBank(model, capacity=4, device=torch.device("cpu"), dtype=torch.float32)
    for slot, name in enumerate(specs, start=1):
        bank.ensure_layout(reads[name].factors)
        bank.put(slot, bank.layout.pack(reads[name].factors, torch.float32))
    pm = peftlab.load(tiny_model("llama", "causal-lm"), tmp_path / "a", "a")
    pm.load_adapter(tmp_path / "b", "b")
    pm.load_adapter(tmp_path / "c", "c")
    pm.set_adapter([])
    routes = ["a", None, "b", "c", "a", "b"]
    slots = [0 if r is None else 1 + list(specs).index(r) for r in routes]
    ids = torch.randint(3, 128, (6, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pm(input_ids=ids, adapter_names=routes).logits
        with bank.call(slots):
            got = model(input_ids=ids).logits  # several tokens per row: the gathered path
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        with bank.call(slots):
            got1 = model(input_ids=ids[:, :1]).logits  # one token per row: the embedding-bag path
        torch.testing.assert_close(got1, pm(input_ids=ids[:, :1], adapter_names=routes).logits, rtol=0, atol=1e-5)
        base = model(input_ids=ids).logits  # outside a bank call: the base model
        torch.testing.assert_close(base, pm(input_ids=ids).logits, rtol=0, atol=0)
        weight = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
        bank.merge(2)  # dLoRA: b folded in; b's rows cost nothing, the others subtract it
        with bank.call(slots):
            merged = model(input_ids=ids).logits
        torch.testing.assert_close(merged, want, rtol=0, atol=1e-4)
        bank.unmerge()
        assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, weight)
    bank.close()


def test_bank_with_output_sizes_that_do_not_pad_cheaply(tmp_path):
    """Output sizes 97 and 89 (primes): the bank is not padded to their multiple, and decoding
    gathers the Bᵀ block instead of reading it as a table; the result is the same."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 97), torch.nn.ReLU(), torch.nn.Linear(97, 89)).eval()
    reads = {}
    for i, (name, r) in enumerate((("a", 3), ("b", 5))):
        save_adapter(model, f"lora[r={r},targets=0|2]", tmp_path / name, seed=i)
        reads[name] = read_adapter_dir(tmp_path / name, model)
    bank = AdapterBank(model, capacity=2, device=torch.device("cpu"), dtype=torch.float32)
    for slot, name in ((1, "a"), (2, "b")):
        bank.ensure_layout(reads[name].factors)
        bank.put(slot, bank.layout.pack(reads[name].factors, torch.float32))
    assert bank.layout.b_table(bank.flat, "2") is None
    pm = peftlab.load(torch.nn.Sequential(torch.nn.Linear(5, 97), torch.nn.ReLU(), torch.nn.Linear(97, 89)), tmp_path / "a", "a")
    pm.model.load_state_dict(model.state_dict())
    pm.load_adapter(tmp_path / "b", "b")
    pm.set_adapter([])
    x = torch.randn(4, 1, 5)
    with torch.no_grad(), bank.call([2, 0, 1, 2]):
        got = model(x)
    with torch.no_grad():
        want = pm(x, adapter_names=["b", None, "a", "b"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    bank.close()
