"""Fused steps (peftlab.serve.fused): one packed model call decodes the running rows and prefills the
admitted prompts; outputs equal separate calls and lone runs, token for token."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import CharTokenizer, busy_runs, lone_runs, save_tiny_adapters, tiny_engine_with, together_runs
from transformers import Gemma2Config, Gemma2ForCausalLM

from peftlab.serve.engine import Engine, GenerationRequest
from peftlab.serve.fused import FusedStep, split_columns

LORAS = {
    "r2": "lora[r=2,targets=q_proj|v_proj]",
    "r6": "lora[r=6,alpha=3,targets=q_proj|k_proj|v_proj|o_proj|down_proj]",
    "dora": "dora[r=4,targets=v_proj|up_proj]",
}


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    # (IA)³ is saved too, but engine() does not load it
    return save_tiny_adapters(tmp_path_factory.mktemp("fused_adapters"), {**LORAS, "ia3": "ia3"}, seed=40)


def engine(root, **kw) -> Engine:
    return tiny_engine_with(root, LORAS, merge_policy=False, **kw)


def prompt(n: int, salt: int = 0) -> list[int]:
    return [3 + (7 * i + salt) % 120 for i in range(n)]


# Prompt lengths from 1 to 60: several attention groups per fused call, and decode rows of very
# different lengths (the long ones attend a second time over all their columns).
LENGTHS = [3, 60, 1, 4, 17, 5, 41, 2, 3, 9]
REQUESTS = [GenerationRequest(prompt(n, k), adapter=[None, *LORAS][k % 4], max_tokens=6 + k % 5)
            for k, n in enumerate(LENGTHS)]


def test_fused_steps_equal_separate_calls_lone_runs_and_busy_batches(lora_dirs):
    fused, separate = engine(lora_dirs, max_batch=16), engine(lora_dirs, max_batch=16, fused_steps=False)
    assert fused.fused_steps and fused.unfused_reason is None
    assert not separate.fused_steps and separate.unfused_reason == "fused_steps=False"
    lone = lone_runs(separate, REQUESTS)
    assert len({tuple(t) for t in lone}) == len(REQUESTS)  # the adapters and prompts change the outputs
    assert together_runs(separate, REQUESTS) == lone
    assert separate.stats()["fused_calls"] == 0
    assert together_runs(fused, REQUESTS) == lone
    assert lone_runs(fused, REQUESTS) == lone
    filler = [GenerationRequest(prompt(30, 9), adapter="r6", max_tokens=30, temperature=1.0, seed=3)]
    assert busy_runs(fused, REQUESTS, filler) == lone  # joining one by one while others decode
    assert fused.stats()["fused_calls"] > 0
    fused.close()
    separate.close()


def test_admitted_prompts_of_any_length_share_one_fused_call(lora_dirs):
    e = engine(lora_dirs, max_batch=8)
    lengths = [3, 40, 4, 42, 5, 20]  # three attention groups: [3, 4, 5], [20], [40, 42]
    handles = [e.submit(GenerationRequest(prompt(n), adapter="r2", max_tokens=2)) for n in lengths]
    e._step()
    assert e.stats()["prefill_calls"] == 1 and e.stats()["fused_calls"] == 1
    while not all(h.done for h in handles):
        e._step()
    separate = engine(lora_dirs, max_batch=8, fused_steps=False)
    assert [h.result().token_ids for h in handles] == together_runs(
        separate, [GenerationRequest(prompt(n), adapter="r2", max_tokens=2) for n in lengths])
    e.close()
    separate.close()


def test_rows_the_fused_step_cannot_carry_take_separate_calls(lora_dirs):
    e, separate = engine(lora_dirs, max_batch=8), engine(lora_dirs, fused_steps=False)
    for x in (e, separate):
        x.load_adapter("ia3", lora_dirs / "ia3")
    requests = [GenerationRequest(prompt(5), adapter="ia3", max_tokens=4), GenerationRequest(prompt(8, 1), adapter="r2", max_tokens=4)]
    mixed = together_runs(e, requests)
    assert e.stats()["fused_calls"] == 0  # (IA)³ is routed per row through the PeftModel: no fused step
    assert mixed == lone_runs(separate, requests)
    together_runs(e, requests[1:])
    assert e.stats()["fused_calls"] > 0
    e.close()
    separate.close()


def test_plan_places_every_token_and_keeps_the_right_logits():
    step = FusedStep.plan([5, 9], [[2, 3], [7]], torch.device("cpu"), torch.float32)
    assert (step.n, step.g, step.width) == (2, 3, 7)
    assert step.token_rows.tolist() == [0, 1, 2, 2, 3, 3, 3] + [4] * 7
    assert step.token_columns.tolist() == [5, 9, 0, 1, 0, 1, 2, *range(7)]
    assert step.keep.tolist() == [0, 1, 3, 6, 13]  # the decode tokens, then each prompt's last token
    first, second = step.groups
    assert (first.row, first.count, first.offset, first.tokens, first.width) == (2, 2, 0, 5, 3)
    assert first.padded_index.tolist() == [0, 1, 3, 4, 5]  # prompt 0 in row 0 of the (2 × 3) block, prompt 1 in row 1
    assert (second.row, second.count, second.offset, second.tokens, second.width) == (4, 1, 5, 7, 7)
    visible = step.decode_mask[:, 0, 0] == 0
    assert visible.sum(1).tolist() == [min(6, step.columns), min(10, step.columns)]


def test_split_columns_leaves_only_the_few_long_rows_to_a_second_pass():
    assert split_columns([10] * 8) == 11  # all alike: one pass over every column
    assert split_columns([3] * 7 + [60]) == 4  # one long row: gathered, the others read 4 columns
    assert split_columns([3, 60]) == 61  # half the rows long: gathering them costs more than it saves
    lengths = [5, 7, 30, 8, 6, 90, 9, 5, 6, 7, 8, 10]
    c = split_columns(lengths)
    reads = lambda c: len(lengths) * c + 3.0 * sum(x >= c for x in lengths) * (max(lengths) + 1)  # noqa: E731
    assert all(reads(c) <= reads(other) for other in range(1, max(lengths) + 2))


def test_a_model_with_soft_capped_attention_keeps_separate_calls():
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, attn_logit_softcapping=0.5, final_logit_softcapping=None,
                          sliding_window=64, max_position_embeddings=128, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    e = Engine(model, CharTokenizer())
    assert not e.fused_steps and "soft-capping" in e.unfused_reason
    ids = prompt(7)
    out = e.generate(GenerationRequest(ids, max_tokens=5))
    with torch.no_grad():
        plain = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=2,
                               pad_token_id=0)[0, len(ids):].tolist()
    assert out.token_ids == plain[: len(out.token_ids)] and len(out.token_ids) >= 1
    e.close()


def test_fused_logits_equal_plain_calls_for_rows_of_very_different_lengths(lora_dirs):
    """Logit-level (greedy tokens of the tiny model hide small attention errors): a fused call
    prefilling ten prompts of 1..60 tokens in several groups, then one decoding all ten (the two
    longest rows attend a second time over all their columns) while two more prompts join."""
    e = engine(lora_dirs)
    prompts = [prompt(n, k) for k, n in enumerate(LENGTHS)]
    late = [prompt(12, 20), prompt(2, 21)]
    with torch.no_grad():
        groups = [[p] for p in prompts[:4]] + [prompts[4:]]
        first = e._fused_logits([], [], groups, [0] * 10)
        order = [p for g in groups for p in g]
        nxt = first.argmax(-1).tolist()
        lengths = [len(p) for p in order]
        assert FusedStep.plan(lengths, [], e.device, torch.float32).long_rows.numel() == 2
        second = e._fused_logits(lengths, nxt, [late], [0] * 12)
        plain = [e.model(input_ids=torch.tensor([p])).logits[0, -1] for p in order]
        again = [e.model(input_ids=torch.tensor([p + [t]])).logits[0, -1] for p, t in zip(order, nxt)]
        joined = [e.model(input_ids=torch.tensor([p])).logits[0, -1] for p in late]
    torch.testing.assert_close(first, torch.stack(plain), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second, torch.stack(again + joined), atol=1e-5, rtol=1e-4)
    e.close()


def test_a_long_row_among_short_ones_grows_the_cache(lora_dirs):
    """The short rows attend over a few columns only; the long one still writes past the cache's
    allocated 64 columns, so the cache must grow for it (the step would fail otherwise)."""
    requests = [GenerationRequest(prompt(3, k), adapter="r2", max_tokens=12) for k in range(7)]
    requests.append(GenerationRequest(prompt(60, 7), adapter="r6", max_tokens=12))
    fused = engine(lora_dirs, max_batch=8, max_context=256)
    separate = engine(lora_dirs, max_batch=8, max_context=256, fused_steps=False)
    out = together_runs(fused, requests)
    assert [len(t) for t in out] == [12] * 8 and fused.stats()["requests_failed"] == 0
    assert out == together_runs(separate, requests)
    fused.close()
    separate.close()

