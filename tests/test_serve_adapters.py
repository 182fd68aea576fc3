"""The engine's adapters: safe loading (allowed roots, symlinks, traversal, pickle, size, header,
config, another base), errors of submit, 1,000 registered adapters over three tiers, and loading /
unloading while requests are in flight (threads), each output compared with a lone run."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading

import pytest
import torch
from conftest import one_thread
from serve_helpers import PROMPTS, CharTokenizer, save_adapter

from peftlab.serve.engine import Engine, GenerationRequest
from peftlab.serve.errors import (
    InvalidAdapterError, InvalidRequestError, PromptTooLongError, QueueFullError, UnknownAdapterError,
)
from peftlab.zoo import tiny_model

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

SPECS = ["lora[r=2,targets=q_proj|v_proj]", "lora[r=4,targets=q_proj|k_proj]", "lora[r=8,targets=v_proj|o_proj]",
         "ia3", "lora[r=3,targets=up_proj]"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Five adapter directories under an allowed root, and a place outside it."""
    root = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    for i, spec in enumerate(SPECS):
        save_adapter(tiny_model("llama", "causal-lm"), spec, root / f"d{i}", seed=20 + i)
    save_adapter(tiny_model("llama", "causal-lm"), SPECS[0], outside / "x", seed=1)
    return root, outside


def engine_over(root, **kw) -> Engine:
    return Engine(tiny_model("llama", "causal-lm"), CharTokenizer(), allowed_roots=[str(root)], **kw)


def test_adapter_paths_and_files_are_checked(dirs, tmp_path):
    root, outside = dirs
    engine = engine_over(root, max_adapter_bytes=10_000)

    def refused(path, *words):
        with pytest.raises(InvalidAdapterError) as e:
            engine.load_adapter("x", path)
        assert e.value.http_status == 400
        for w in words:
            assert w in str(e.value), str(e.value)

    refused(outside / "x", "outside the allowed roots")
    refused(root / ".." / outside.name / "x", "outside the allowed roots")  # traversal
    link = root / "link"
    link.symlink_to(outside / "x", target_is_directory=True)
    refused(link, "outside the allowed roots", str((outside / "x").resolve()))  # symlinks resolved first
    inner = root / "inner_link"
    inner.mkdir()
    shutil.copy(root / "d0" / "adapter_config.json", inner)
    (inner / "adapter_model.safetensors").symlink_to(outside / "x" / "adapter_model.safetensors")
    refused(inner, "outside the allowed roots")  # a file in it that links out
    refused(root / "missing", "does not exist")
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(root / "d0" / "adapter_config.json", pickled)
    torch.save({"w": torch.zeros(2)}, pickled / "adapter_model.bin")
    refused(pickled, "pickle", "never loaded")
    garbage = root / "garbage"
    shutil.copytree(root / "d0", garbage)
    (garbage / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    refused(garbage, "not a safetensors file")
    bad_config = root / "bad_config"
    shutil.copytree(root / "d0", bad_config)
    cfg = json.loads((bad_config / "adapter_config.json").read_text())
    (bad_config / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "NOPE"}))
    (bad_config / "peftlab_config.json").unlink()
    refused(bad_config, "unsupported adapter type")
    other_base = root / "other_base"
    save_adapter(tiny_model("gpt2", "causal-lm"), "lora[r=2,targets=c_attn]", other_base, seed=2)
    refused(other_base, "does not fit")
    save_adapter(tiny_model("llama", "causal-lm"), "prompt[length=2]+prefix[length=2]", root / "both", seed=3)
    refused(root / "both", "soft prompt and a prefix")  # not run together by the library's generate either
    big = engine_over(root, max_adapter_bytes=100)
    with pytest.raises(InvalidAdapterError, match="too big"):
        big.load_adapter("x", root / "d2")
    with pytest.raises(InvalidRequestError) as e:
        engine.load_adapter("a.b", root / "d0")
    assert e.value.field == "lora_name"
    assert engine.adapter_names() == []  # nothing was registered by any of these
    engine.close()
    big.close()


def test_submit_refuses_bad_requests_at_once(dirs):
    root, _ = dirs
    engine = engine_over(root, max_queue=2, max_context=16)
    engine.load_adapter("a", root / "d0")
    with pytest.raises(UnknownAdapterError) as e:
        engine.submit(GenerationRequest([5, 6], adapter="nope"))
    assert e.value.http_status == 404 and "'nope'" in str(e.value) and "['a']" in str(e.value)
    with pytest.raises(PromptTooLongError, match="16"):
        engine.submit(GenerationRequest(list(range(3, 19))))
    for kwargs, name in (({"prompt_ids": []}, "prompt_ids"), ({"prompt_ids": [5, 500]}, "prompt_ids"),
                         ({"max_tokens": 0}, "max_tokens"), ({"top_p": 0.0}, "top_p"),
                         ({"temperature": -1.0}, "temperature"), ({"stop": [""]}, "stop"), ({"seed": 1.5}, "seed")):
        req = GenerationRequest(**{"prompt_ids": [5, 6], **kwargs})
        with pytest.raises(InvalidRequestError) as e:
            engine.submit(req)
        assert e.value.field == name and e.value.http_status == 400 and name in str(e.value)
    engine.submit(GenerationRequest([5, 6], adapter="a"))
    engine.submit(GenerationRequest([5, 6]))
    with pytest.raises(QueueFullError) as e:
        engine.submit(GenerationRequest([5, 6]))
    assert e.value.http_status == 429 and e.value.retry_after > 0
    assert engine.stats()["queue_length"] == 2
    engine.close()


def test_a_thousand_adapters_over_three_tiers(dirs):
    root, _ = dirs
    one = os.path.getsize(root / "d0" / "adapter_model.safetensors")
    engine = engine_over(root, device_adapters=4, host_budget_bytes=12 * one, max_batch=8, merge_policy=False)
    names = [f"n{i:04d}" for i in range(1000)]
    for i, name in enumerate(names):
        engine.load_adapter(name, root / f"d{i % len(SPECS)}")
    stats = engine.stats()
    assert stats["registered_adapters"] == 1000 and stats["host_adapter_bytes"] <= 12 * one + 4 * one
    assert stats["host_adapters"] < 100  # the rest went back to disk
    picks = random.Random(0).sample(names, 16)
    requests = [GenerationRequest(PROMPTS[k % 4], adapter=n, max_tokens=6) for k, n in enumerate(picks)]
    lone = [engine.generate(GenerationRequest(r.prompt_ids, r.adapter, r.max_tokens)).token_ids for r in requests]
    by_dir = {}
    for r, t in zip(requests, lone):  # names over the same directory give the same output
        key = (names.index(r.adapter) % len(SPECS), tuple(r.prompt_ids))
        assert by_dir.setdefault(key, t) == t
    engine.start()
    try:
        handles = [engine.submit(GenerationRequest(r.prompt_ids, r.adapter, r.max_tokens)) for r in requests]
        assert [h.result(timeout=60).token_ids for h in handles] == lone
    finally:
        engine.stop()
    stats = engine.stats()
    assert stats["cache_misses"] > 0 and stats["device_adapters"] <= 4  # read back from disk by the loader
    assert stats["requests_failed"] == 0
    engine.close()


def test_loading_and_unloading_while_requests_are_in_flight(dirs):
    root, _ = dirs
    engine = engine_over(root, device_adapters=3, max_batch=6, merge_policy=False)
    for i in range(4):
        engine.load_adapter(f"a{i}", root / f"d{i}")
    requests = [GenerationRequest(PROMPTS[k % 4], adapter=f"a{k % 4}", max_tokens=12) for k in range(8)]
    lone = [engine.generate(GenerationRequest(r.prompt_ids, r.adapter, r.max_tokens)).token_ids for r in requests]
    engine.start()
    errors: list[BaseException] = []
    stop = threading.Event()

    def churn():  # load, replace and unload other adapters (and reload a2 from its own directory)
        try:
            k = 0
            while not stop.is_set():
                engine.load_adapter("x", root / f"d{k % len(SPECS)}")
                engine.load_adapter("a2", root / "d2")
                h = engine.submit(GenerationRequest(PROMPTS[0], adapter="x", max_tokens=3))
                engine.unload_adapter("x")  # with its request in flight: that request still finishes
                h.result(timeout=60)
                k += 1
        except BaseException as e:  # reported below
            errors.append(e)

    def clients(out: list):
        try:
            for _ in range(3):
                handles = [engine.submit(GenerationRequest(r.prompt_ids, r.adapter, r.max_tokens)) for r in requests]
                out.append([h.result(timeout=60).token_ids for h in handles])
        except BaseException as e:
            errors.append(e)

    results: list = []
    threads = [threading.Thread(target=churn), threading.Thread(target=clients, args=(results,))]
    for t in threads:
        t.start()
    threads[1].join()
    stop.set()
    threads[0].join()
    engine.stop()
    assert not errors, errors
    assert results == [lone] * 3
    with pytest.raises(UnknownAdapterError):
        engine.submit(GenerationRequest([5], adapter="x"))
    with pytest.raises(UnknownAdapterError):
        engine.unload_adapter("x")
    engine.adapters.maintain()
    assert all(e.name != "x" for e in engine.adapters._device.values())  # gone from the device once done
    engine.close()


def test_the_engine_refuses_what_it_cannot_serve():
    import peftlab

    with pytest.raises(TypeError, match="not a PeftModel"):
        Engine(peftlab.apply(tiny_model("llama", "causal-lm"), "ia3"), CharTokenizer())
    with pytest.raises(TypeError, match="output head"):
        Engine(tiny_model("bert"), CharTokenizer())
    with pytest.raises(ValueError, match="max_batch"):
        Engine(tiny_model("llama", "causal-lm"), CharTokenizer(), max_batch=0)
