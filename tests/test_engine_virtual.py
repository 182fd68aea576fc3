"""The serving engine's model-site methods in the shared batch: soft prompts (prompt tuning,
P-tuning), MAM (prefix + scaled parallel adapter), UniPELT (gated LoRA + gated prefix + gated
adapter) and unions with a prefix or a soft prompt. Each request gives the same tokens alone, in a
busy batch of LoRA rows it joins mid-way, prefilled together with others, and as the library's own
``pm.generate`` of its adapter; seeded sampling is the same alone and busy."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import one_thread
from safetensors.torch import load_file, save_file
from serve_helpers import PROMPTS, CharTokenizer, busy_runs, lone_runs, save_adapter, together_runs, until_eos

import peftlab
from peftlab.methods.additive.prompt import PromptConfig
from peftlab.serve.engine import Engine, GenerationRequest
from peftlab.serve.errors import InvalidAdapterError, PromptTooLongError
from peftlab.serve.merge_policy import MergePolicy
from peftlab.serve.scheduler import Waiting, unpadded_where_needed
from peftlab.zoo import load, tiny_model

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = {
    "prompt": "prompt[length=4,init=random]",
    "ptuning": "ptuning[length=3,encoder=lstm,hidden=16]",
    "mam": "mam[length=4,reduction_factor=2,scale=4]",
    "unipelt": "unipelt[r=4,length=3,reduction_factor=4]",
    "gated_prefix": "prefix[length=5,gate=true,init=random]",
    "restart": "prefix[length=3,offset_positions=false,init=random]",  # the prompt numbered from 0 after it
    "prefix_lora": "prefix[length=2,init=random]+lora[r=2,targets=q_proj|v_proj]",  # the LoRA part in the bank
    "prompt_ia3": "prompt[length=2,init=random]+ia3",  # the (IA)³ part routed per row
    "lora": "lora[r=2,targets=q_proj|v_proj]",
}
KINDS = [n for n in TINY if n != "lora"]


def _library_greedy(root, name: str, prompt: list[int], max_tokens: int) -> list[int]:
    pm = peftlab.load(tiny_model("llama", "causal-lm"), root / name).eval()
    out = pm.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=2,
                      pad_token_id=0)
    return until_eos(out[0, len(prompt):].tolist())


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("virtual_adapters")
    for i, (name, spec) in enumerate(TINY.items()):
        save_adapter(tiny_model("llama", "causal-lm"), spec, root / name, seed=20 + i, std=1.0 if name == "unipelt" else 2.0)
    # UniPELT again with only its prefix gates nearly shut (bias − 6): the same batch must keep them apart
    shutil.copytree(root / "unipelt", root / "unipelt_shut")
    tensors = load_file(root / "unipelt" / "adapter_model.safetensors")
    shut = {k: v - 6 if k.startswith("parts.1.gates.") and k.endswith(".bias") else v for k, v in tensors.items()}
    save_file(shut, root / "unipelt_shut" / "adapter_model.safetensors")
    return root


def _engine(root, names, **kw) -> Engine:
    engine = Engine(tiny_model("llama", "causal-lm"), CharTokenizer(), allowed_roots=[str(root)], merge_policy=False, **kw)
    for name in names:
        engine.load_adapter(name, root / name)
    return engine


def test_each_kind_alone_equals_the_librarys_generate_busy_and_together(tiny_root):
    names = KINDS + ["unipelt_shut", "lora"]
    engine = _engine(tiny_root, names, max_batch=6)
    kinds = {n: engine.adapters.get(n).kind for n in names}
    assert kinds == {"prompt": "virtual", "ptuning": "virtual", "mam": "routed", "unipelt": "routed",
                     "gated_prefix": "virtual", "restart": "virtual", "prefix_lora": "bank", "prompt_ia3": "routed", "unipelt_shut": "routed",
                     "lora": "bank"}
    assert [engine.adapters.get(n).virtual_length for n in ("prompt", "ptuning", "mam", "prefix_lora")] == [4, 3, 4, 2]
    requests = [GenerationRequest(PROMPTS[i % 4], adapter=a, max_tokens=14) for i, a in enumerate(names + names[:7])]
    lone = lone_runs(engine, requests)
    for r, tokens in zip(requests, lone):
        assert tokens == _library_greedy(tiny_root, r.adapter, r.prompt_ids, 14), r.adapter
    base = lone_runs(engine, [GenerationRequest(p, max_tokens=14) for p in PROMPTS])
    for r, tokens in zip(requests, lone):  # every adapter changes the output of its prompt
        assert tokens != base[PROMPTS.index(r.prompt_ids)], r.adapter
    unipelt, shut = (lone_runs(engine, [GenerationRequest(PROMPTS[0], adapter=a, max_tokens=14)])[0]
                     for a in ("unipelt", "unipelt_shut"))
    assert unipelt != shut  # the prefix gates count: rows of the two must not share theirs
    # LoRA requests running, then each request joining one by one (6 rows at most: some wait)
    filler = [GenerationRequest(PROMPTS[2], adapter="lora", max_tokens=40, temperature=1.0, seed=1),
              GenerationRequest(PROMPTS[0], adapter="lora", max_tokens=30)]
    assert busy_runs(engine, requests, filler) == lone
    # all submitted at once: soft prompts, prefixes, gated rows and LoRA rows prefilled in shared groups
    calls = engine.stats()["prefill_calls"]
    assert together_runs(engine, requests) == lone
    assert engine.stats()["prefill_calls"] - calls < len(requests)  # groups shared across kinds
    engine.close()


def test_seeded_sampling_is_the_same_alone_and_busy(tiny_root):
    engine = _engine(tiny_root, KINDS + ["lora"], max_batch=8)
    requests = [GenerationRequest(PROMPTS[i % 4], adapter=a, max_tokens=12, temperature=0.9, top_p=0.95, seed=i)
                for i, a in enumerate(KINDS)]
    lone = lone_runs(engine, requests)
    greedy = lone_runs(engine, [GenerationRequest(r.prompt_ids, r.adapter, 12) for r in requests])
    assert lone != greedy  # sampling really drew
    filler = [GenerationRequest(PROMPTS[1], adapter="lora", max_tokens=40, temperature=1.0, seed=4)]
    assert busy_runs(engine, requests, filler) == lone
    engine.close()


def test_a_gated_row_is_never_padded_in_its_prefill(tiny_root):
    """UniPELT's gates average over a call's positions, padding included, so a gated row is prefilled
    only where no prompt is longer than its own; the grouping cuts groups after such rows."""
    engine = _engine(tiny_root, ["unipelt"], max_batch=8)
    short, long = [5, 17, 33], [7, 7, 90, 120, 45]
    entry = engine.adapters.get("unipelt")
    assert engine.adapters.ensure_device(entry)
    alone = engine._prefill_logits([short], 0, [0], [entry.key], [entry.virtual])
    padded = engine._prefill_logits([short, long], 0, [0, 0], [entry.key, None], [entry.virtual, None])
    engine.kv.clear()
    assert (padded[0] - alone[0]).abs().max() > 1e-4  # padding would change the gated row: hence the rule

    def item(n: int, gated: bool) -> Waiting:
        return Waiting(None, None, None, 0.0, 0.0, n, {"gated": gated})

    group = [item(3, False), item(4, True), item(4, False), item(5, False), item(6, True), item(7, False)]
    cut = unpadded_where_needed([group], lambda w: w.extra["gated"])
    assert [[w.prompt_len for w in g] for g in cut] == [[3, 4, 4], [5, 6], [7]]
    requests = [GenerationRequest(p, adapter=a, max_tokens=10) for p, a in ((short, "unipelt"), (long, None),
                                                                             (short[:2], None), (long, "unipelt"))]
    lone = lone_runs(engine, requests)
    calls = engine.stats()["prefill_calls"]
    assert together_runs(engine, requests) == lone
    assert engine.stats()["prefill_calls"] - calls == 2  # [2, 3 (unipelt)] and [5, 5 (unipelt)]
    engine.close()


def test_a_prefix_with_offset_positions_false_numbers_the_prompt_from_zero(tiny_root):
    """Its cache row holds p prefix columns, but the prompt's tokens sit at positions 0, 1, ... as in
    the library (a small effect on the tiny model's RoPE, so logits are compared, not tokens)."""
    engine = _engine(tiny_root, ["restart"])
    entry = engine.adapters.get("restart")
    assert engine.adapters.ensure_device(entry) and entry.virtual.position_shift == 3
    prompt = PROMPTS[0]
    first = engine._prefill_logits([prompt], 0, [0], None, [entry.virtual])
    token = int(first.argmax())
    lengths = torch.tensor([3 + len(prompt)])
    second = engine._decode_logits(torch.tensor([token]), lengths, [0], None, None, torch.tensor([3]))
    engine.kv.clear()
    pm = peftlab.load(tiny_model("llama", "causal-lm"), tiny_root / "restart").eval()
    with torch.no_grad():
        want = [pm(input_ids=torch.tensor([ids])).logits[0, -1] for ids in (prompt, prompt + [token])]
        after = pm(input_ids=torch.tensor([prompt]), position_ids=torch.arange(3, 3 + len(prompt))[None]).logits[0, -1]
    torch.testing.assert_close(first[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(second[0], want[1], atol=1e-5, rtol=0)
    assert (after - want[0]).abs().max() > 1e-3  # numbering after the prefix would show
    engine.close()


def test_virtual_parts_go_back_to_disk_and_return_with_the_same_outputs(tiny_root):
    """One device place and no host memory: every request's adapter is read back from disk by the
    loader thread (prefix, soft prompt, gates and routed layers), with the outputs of a roomy engine."""
    names = ["prompt", "mam", "unipelt", "prefix_lora", "prompt_ia3"]
    requests = [GenerationRequest(PROMPTS[i % 4], adapter=a, max_tokens=8) for i, a in enumerate(names * 2)]
    roomy = _engine(tiny_root, names, max_batch=4)
    lone = lone_runs(roomy, requests)
    roomy.close()
    tight = _engine(tiny_root, names, max_batch=4, device_adapters=1, host_budget_bytes=1)
    assert tight.stats()["host_adapters"] <= 1
    assert busy_runs(tight, requests, []) == lone
    stats = tight.stats()
    assert stats["cache_misses"] >= len(names) and stats["device_adapters"] == 1 and stats["requests_failed"] == 0
    tight.close()


def test_outputs_stay_equal_while_a_prefixed_lora_is_merged_under_soft_prompt_rows(tiny_root):
    """dLoRA merges the prefix+LoRA union's LoRA part (its prefix stays per row) while soft-prompt
    rows and base rows share the batch: every row keeps its lone output."""
    engine = _engine(tiny_root, ["prefix_lora", "prompt", "ptuning"], max_batch=8)
    requests = ([GenerationRequest(PROMPTS[i % 4], adapter="prefix_lora", max_tokens=10) for i in range(5)]
                + [GenerationRequest(PROMPTS[1], adapter="prompt", max_tokens=10),
                   GenerationRequest(PROMPTS[2], adapter="ptuning", max_tokens=10), GenerationRequest(PROMPTS[3], max_tokens=10)])
    lone = lone_runs(engine, requests)
    engine.policy = MergePolicy(merge_share=0.6, unmerge_share=0.5, min_requests=4)
    assert together_runs(engine, requests) == lone
    assert engine.stats()["merges"] >= 1 and engine.bank.merged is not None
    engine._step()  # idle: nothing holds the merged adapter any more
    assert engine.stats()["unmerges"] >= 1 and engine.bank.merged is None
    engine.close()


def test_virtual_tokens_count_against_the_context(tiny_root):
    engine = _engine(tiny_root, ["prompt"], max_context=16)  # the soft prompt holds 4 positions
    with pytest.raises(PromptTooLongError, match="4 virtual tokens"):
        engine.submit(GenerationRequest([5 + i for i in range(12)], adapter="prompt"))
    engine.submit(GenerationRequest([5 + i for i in range(12)]))  # without the adapter it fits
    done = engine.generate(GenerationRequest([5 + i for i in range(11)], adapter="prompt", max_tokens=50))
    assert done.finish_reason == "length" and done.completion_tokens == 1  # 4 + 11 + 1 = the context
    engine.close()


def test_what_cannot_be_served_exactly_is_refused_with_the_reason(tmp_path):
    engine = Engine(tiny_model("llama", "causal-lm"), CharTokenizer(), allowed_roots=[str(tmp_path)])
    cases = {
        "mixed": ("prefix[length=2,init=random]+prefix[length=2,offset_positions=false,init=random]", "number the prompt"),
        "two": ("prompt[length=2,init=random]+prefix[length=2,init=random]", "soft prompt and a prefix"),
        "gated": ("prompt[length=2,init=random]+lora[r=2,gate=true,targets=q_proj]", "gated layers"),
    }
    for name, (spec, why) in cases.items():
        save_adapter(tiny_model("llama", "causal-lm"), spec, tmp_path / name, seed=1)
        with pytest.raises(InvalidAdapterError, match=why) as e:
            engine.load_adapter(name, tmp_path / name)
        assert "peftlab.load(model, dir).generate" in str(e.value)
    assert engine.adapter_names() == []
    engine.close()


SMOL = {
    "prompt": None,  # from a text: random virtual tokens barely move SmolLM2's first tokens
    "ptuning": "ptuning[length=4]",
    "mam": "mam[length=6,reduction_factor=16,scale=4]",
    "unipelt": "unipelt[r=4,length=4,reduction_factor=16]",
    "lora": "lora[r=4,targets=q_proj|v_proj]",
}


def test_smollm2_soft_prompts_mam_and_unipelt_alone_busy_and_library(tmp_path):
    model, tok = load("smollm2")
    for i, (name, spec) in enumerate(SMOL.items()):
        if spec is not None:
            save_adapter(model, spec, tmp_path / name, seed=40 + i, std=1.0)
    pm = peftlab.apply(model, PromptConfig.from_text("Kartoffel Kartoffel Kartoffel Kartoffel", tok))
    pm.save(tmp_path / "prompt")
    pm.unload()
    prompts = [tok(t)["input_ids"] for t in ("The capital of France is", "def fibonacci(n):")]
    requests = [GenerationRequest(prompts[i % 2], adapter=a, max_tokens=4) for i, a in enumerate(SMOL) if a != "lora"]
    reference = []
    with torch.no_grad():
        for r in requests:
            pm = peftlab.load(model, tmp_path / r.adapter).eval()
            out = pm.generate(input_ids=torch.tensor([r.prompt_ids]), max_new_tokens=4, do_sample=False)
            reference.append(out[0, len(r.prompt_ids):].tolist())
            pm.unload()
    engine = Engine(model, tok, max_batch=8, allowed_roots=[str(tmp_path)], merge_policy=False)
    for name in SMOL:
        engine.load_adapter(name, tmp_path / name)
    lone = lone_runs(engine, requests)
    assert lone == reference
    base = lone_runs(engine, [GenerationRequest(p, max_tokens=4) for p in prompts])
    assert all(t != base[i % 2] for i, t in enumerate(lone)), (lone, base)
    filler = [GenerationRequest(prompts[1], adapter="lora", max_tokens=10, temperature=0.8, seed=3)]
    # top_p = 0.5: a draw among 49k tokens of tiny probability can flip with the batch's float rounding
    sampled = [GenerationRequest(r.prompt_ids, r.adapter, 4, temperature=0.8, top_p=0.5, seed=9) for r in requests[:2]]
    lone_sampled = lone_runs(engine, sampled)
    assert busy_runs(engine, requests + sampled, filler) == lone + lone_sampled
    engine.close()
