"""The serving engine on the real SmolLM2 and on tiny models: a request's output is the same alone
and in a busy batch of other adapters (LoRA of different ranks in the bank, (IA)³ routed per row, the
base), and equals the library's own generate; sampling is reproducible per seed; stop strings, max
tokens, streaming, cancelling; continuous batching; dLoRA merging keeps outputs; scheduling."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import one_thread
from serve_helpers import (PROMPTS, CharTokenizer, busy_runs, lone_runs, save_adapter, save_tiny_adapters,
                           tiny_engine_with, together_runs, until_eos)

import peftlab
from peftlab.serve.engine import Engine, GenerationRequest
from peftlab.serve.merge_policy import MergePolicy
from peftlab.zoo import load, tiny_model

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMOL_ADAPTERS = {
    "r4": "lora[r=4,alpha=8,targets=q_proj|v_proj]",
    "r8": "lora[r=8,alpha=8,targets=q_proj|k_proj|v_proj|o_proj]",
    "r16": "lora[r=16,alpha=32,targets=q_proj|v_proj|down_proj]",
    "ia3": "ia3",
}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 with four adapters (three LoRA ranks, (IA)³), the library's own greedy outputs for
    two of them, and an engine over it (not started)."""
    model, tok = load("smollm2")
    root = tmp_path_factory.mktemp("smol_adapters")
    for i, (name, spec) in enumerate(SMOL_ADAPTERS.items()):
        save_adapter(model, spec, root / name, seed=i, std=1.0 if name != "r16" else 0.3)
    prompts = [tok(t)["input_ids"] for t in ("The capital of France is", "def fibonacci(n):",
                                             "Once upon a time, in a small village", "2 + 2 =")]
    reference = {}
    with torch.no_grad():
        for name, i in (("r8", 2), ("ia3", 0)):
            pm = peftlab.load(model, root / name).eval()
            out = pm.generate(input_ids=torch.tensor([prompts[i]]), max_new_tokens=6, do_sample=False)
            reference[(name, i)] = out[0, len(prompts[i]):].tolist()
            pm.unload()
    engine = Engine(model, tok, max_batch=8, allowed_roots=[str(root)], merge_policy=False)
    for name in SMOL_ADAPTERS:
        engine.load_adapter(name, root / name)
    yield engine, tok, prompts, reference
    engine.close()


def test_smollm2_alone_equals_busy_batch_and_the_librarys_generate(smol):
    engine, tok, prompts, reference = smol
    requests = [GenerationRequest(prompts[i % 4], adapter=a, max_tokens=6)
                for i, a in enumerate([None, "r4", "r8", "r16", "ia3", "r8"])]
    lone = lone_runs(engine, requests)
    assert lone[2] == reference[("r8", 2)] and lone[4] == reference[("ia3", 0)]
    base = lone_runs(engine, [GenerationRequest(prompts[2], max_tokens=6)])[0]
    assert lone[2] != base and lone[4] != lone[0]  # the adapters change the output
    steps_before = engine.stats()["steps"]
    filler = [GenerationRequest(prompts[3], adapter="r16", max_tokens=8, temperature=0.9, seed=5)]
    assert busy_runs(engine, requests, filler) == lone
    # They shared decode steps: far fewer steps than the tokens they generated.
    assert engine.stats()["steps"] - steps_before < sum(len(t) for t in lone)


def test_smollm2_stop_strings_max_tokens_and_streaming(smol):
    engine, tok, prompts, _ = smol
    full = engine.generate(GenerationRequest(prompts[2], adapter="r4", max_tokens=12))
    assert full.finish_reason == "length" and full.completion_tokens == 12 == len(full.token_ids)
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    engine.start()
    try:
        h = engine.submit(GenerationRequest(prompts[2], adapter="r4", max_tokens=12, stop=[stop]))
        events = list(h.stream(timeout=60))
        res = h.result(timeout=60)
    finally:
        engine.stop()
    assert res.finish_reason == "stop"
    assert res.text == full.text[: full.text.index(stop)] and stop not in res.text
    assert "".join(e.text for e in events) == res.text
    assert [e.token_id for e in events] == res.token_ids == full.token_ids[: len(res.token_ids)]
    assert 0 < res.first_token_s <= res.total_s


def test_smollm2_outputs_stay_equal_across_a_merge_and_unmerge(smol):
    engine, _, prompts, _ = smol
    requests = [GenerationRequest(prompts[i % 4], adapter="r8", max_tokens=5) for i in range(4)]
    late = [GenerationRequest(prompts[i], adapter=a, max_tokens=5) for i, a in ((1, "r4"), (2, None))]
    lone = lone_runs(engine, requests + late)
    q = engine.model.model.layers[0].self_attn.q_proj.weight
    before = q.detach().clone()
    engine.policy = MergePolicy(merge_share=0.8, unmerge_share=0.7, min_requests=3)
    engine.start()
    try:
        handles = [engine.submit(GenerationRequest(list(r.prompt_ids), r.adapter, r.max_tokens)) for r in requests]
        next(iter(handles[0].stream(timeout=60)))  # r8 dominates: merged by now
        merged_during = engine.stats()["merges"]
        handles += [engine.submit(GenerationRequest(list(r.prompt_ids), r.adapter, r.max_tokens)) for r in late]
        out = [h.result(timeout=120).token_ids for h in handles]
    finally:
        engine.stop()
        engine.policy = None
        engine._apply_merge_policy()
    assert merged_during >= 1 and engine.stats()["unmerges"] >= 1
    assert out == lone
    assert torch.equal(q, before)  # unmerging restores the base weights exactly


# -- tiny models: many cases, fast -----------------------------------------------------------------------
TINY_ADAPTERS = {
    "r2": "lora[r=2,targets=q_proj|v_proj]",
    "r6": "lora[r=6,alpha=3,targets=q_proj|k_proj|v_proj|o_proj|down_proj]",  # after r2: the bank's modules, another order
    "pissa": "lora[r=4,init=pissa,targets=v_proj]",
    "ia3": "ia3",
    "par_adapter": "par_adapter[r=8,scale=4,site=ffn]",
    "houlsby": "houlsby[reduction_factor=4]",
    "prefix": "prefix[length=5,init=random]",
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return save_tiny_adapters(tmp_path_factory.mktemp("tiny_adapters"), TINY_ADAPTERS, seed=10)


def tiny_engine(root, **kw) -> Engine:
    return tiny_engine_with(root, TINY_ADAPTERS, **kw)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate-calls"])
def test_tiny_alone_equals_busy_and_equals_each_adapters_generate(tiny_dirs, fused):
    engine = tiny_engine(tiny_dirs, max_batch=6, merge_policy=False, fused_steps=fused)
    assert engine.fused_steps is fused
    names = [None, *TINY_ADAPTERS]
    requests = [GenerationRequest(PROMPTS[i % 4], adapter=a, max_tokens=24) for i, a in enumerate(names + names[1:4])]
    lone = lone_runs(engine, requests)
    for r, tokens in zip(requests[: len(names)], lone):  # the library's own greedy generate
        model = tiny_model("llama", "causal-lm")
        net = peftlab.load(model, tiny_dirs / r.adapter).eval() if r.adapter else model
        out = net.generate(input_ids=torch.tensor([r.prompt_ids]), max_new_tokens=24, do_sample=False,
                           eos_token_id=2, pad_token_id=0)[0, len(r.prompt_ids):].tolist()
        assert tokens == until_eos(out), r.adapter
    assert len({tuple(t) for t in lone[: len(names)]}) > 4
    filler = [GenerationRequest(PROMPTS[2], adapter="r6", max_tokens=40, temperature=1.0, seed=1)]
    assert busy_runs(engine, requests, filler) == lone  # 6 rows at most: some wait, all join mid-way
    prefill_calls = engine.stats()["prefill_calls"]
    six = slice(len(names) - 6, len(names))  # r6 ... prefix: the prefix shares a group with pissa (same length)
    assert together_runs(engine, requests[six]) == lone[six]
    assert engine.stats()["prefill_calls"] - prefill_calls == 2  # lengths [1, 1, 3, 6] and [13, 13]
    assert engine.kv.columns == 0  # idle: the cache is freed
    engine.close()


def test_tiny_gpt2_conv1d_lora_in_the_bank_with_bitfit_rows(tmp_path):
    save_adapter(tiny_model("gpt2", "causal-lm"), "lora[r=4,targets=c_attn]", tmp_path / "g", seed=3)
    save_adapter(tiny_model("gpt2", "causal-lm"), "lora[r=2,targets=c_attn|c_proj]", tmp_path / "h", seed=4)
    save_adapter(tiny_model("gpt2", "causal-lm"), "bitfit", tmp_path / "bias", seed=5)
    engine = Engine(tiny_model("gpt2", "causal-lm"), CharTokenizer(), merge_policy=False)
    for name in ("g", "h", "bias"):
        engine.load_adapter(name, tmp_path / name)
    assert engine.adapters.get("g").kind == "bank" and engine.adapters.get("bias").kind == "routed"
    requests = [GenerationRequest(PROMPTS[i % 4], adapter=a, max_tokens=10) for i, a in enumerate(["g", "h", None, "bias", "g"])]
    lone = lone_runs(engine, requests)
    ref = peftlab.load(tiny_model("gpt2", "causal-lm"), tmp_path / "g").eval()
    out = ref.generate(input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=10, do_sample=False, eos_token_id=2,
                       pad_token_id=0)[0, len(PROMPTS[0]):].tolist()
    assert lone[0] == until_eos(out)
    assert busy_runs(engine, requests, []) == lone
    engine.close()


def test_sampling_is_reproducible_per_seed_alone_or_batched(tiny_dirs):
    engine = tiny_engine(tiny_dirs, max_batch=8, merge_policy=False, max_context=256)
    requests = [GenerationRequest(PROMPTS[0], adapter=a, max_tokens=20, temperature=t, top_p=p, seed=s)
                for a, t, p, s in (("r2", 0.8, 0.9, 7), ("r2", 0.8, 0.9, 8), (None, 1.5, 1.0, 7), ("ia3", 0.5, 0.5, 3))]
    # the last to join has a 70-token prompt: the cache grows beyond 64 columns under the running rows
    requests.append(GenerationRequest([3 + i % 120 for i in range(70)], adapter="r6", max_tokens=10, temperature=0.7, seed=11))
    lone = lone_runs(engine, requests)
    assert lone == lone_runs(engine, requests)
    assert lone[0] != lone[1]  # another seed, another sample
    filler = [GenerationRequest(PROMPTS[1], adapter="r6", max_tokens=40, temperature=1.0, seed=4)]
    assert busy_runs(engine, requests, filler) == lone
    assert engine.kv.peak_columns > 64  # the cache grew while rows were in it
    greedy = lone_runs(engine, [GenerationRequest(PROMPTS[0], adapter="r2", max_tokens=20)])[0]
    tiny_p = lone_runs(engine, [GenerationRequest(PROMPTS[0], adapter="r2", max_tokens=20, temperature=1.0, top_p=1e-6, seed=9)])[0]
    assert tiny_p == greedy  # top_p that keeps one token is greedy
    engine.close()


def test_cancel_and_deadline_and_earliest_deadline_first(tiny_dirs):
    engine = tiny_engine(tiny_dirs, max_batch=1, merge_policy=False, max_context=4096)  # RoPE goes beyond 64
    now = time.monotonic()
    late = engine.submit(GenerationRequest(PROMPTS[0], max_tokens=5))  # due 60 s after arrival (default_slack_s)
    due_later = engine.submit(GenerationRequest(PROMPTS[1], adapter="r2", max_tokens=5, deadline=now + 30))
    due_first = engine.submit(GenerationRequest(PROMPTS[2], adapter="ia3", max_tokens=5, deadline=now - 1))
    finished = []
    while len(finished) < 3:
        engine._step()
        for name, h in (("late", late), ("due_later", due_later), ("due_first", due_first)):
            if h.done and name not in finished:
                finished.append(name)
    assert finished == ["due_first", "due_later", "late"]
    assert due_first.result().deadline_missed and not due_later.result().deadline_missed
    long = engine.submit(GenerationRequest(PROMPTS[0], max_tokens=3000))
    engine.start()
    try:
        stream = iter(long.stream(timeout=30))
        next(stream)
        long.cancel()
        res = long.result(timeout=30)
    finally:
        engine.stop()
    assert res.finish_reason == "cancelled" and res.completion_tokens < 3000
    engine.close()


def test_prompts_are_prefilled_in_groups_of_similar_length(tiny_dirs):
    """Without fused steps, one prefill call per group (test_serve_fused.py: fused, one call)."""
    engine = tiny_engine(tiny_dirs, max_batch=8, merge_policy=False, fused_steps=False)
    lengths = [3, 40, 4, 42, 5, 20]
    handles = [engine.submit(GenerationRequest([5 + i % 100 for i in range(n)], max_tokens=2)) for n in lengths]
    engine._step()
    assert engine.stats()["prefill_calls"] == 3  # [3, 4, 5], [20], [40, 42]
    while not all(h.done for h in handles):
        engine._step()
    engine.close()


def test_an_adapter_built_while_another_is_merged_sees_the_original_weights(tiny_dirs):
    """PiSSA's residual is computed from the base weights when the adapter is built: loading it
    while another adapter is merged (dLoRA) must not see the merged weights."""
    policy = MergePolicy(merge_share=0.5, unmerge_share=0.5, min_requests=1)
    engine = Engine(tiny_model("llama", "causal-lm"), CharTokenizer(), allowed_roots=[str(tiny_dirs)], merge_policy=policy)
    engine.load_adapter("r2", tiny_dirs / "r2")
    engine.generate(GenerationRequest(PROMPTS[0], adapter="r2", max_tokens=3))
    assert engine.bank.merged is not None  # r2 merged while its request ran, not yet unmerged
    engine.load_adapter("pissa", tiny_dirs / "pissa")
    got = engine.generate(GenerationRequest(PROMPTS[1], adapter="pissa", max_tokens=12)).token_ids
    ref = peftlab.load(tiny_model("llama", "causal-lm"), tiny_dirs / "pissa").eval()
    want = ref.generate(input_ids=torch.tensor([PROMPTS[1]]), max_new_tokens=12, do_sample=False, eos_token_id=2,
                        pad_token_id=0)[0, len(PROMPTS[1]):].tolist()
    assert got == until_eos(want)
    engine.close()
