"""``peftlab serve --model DIR`` with a local Hugging Face causal-LM directory: a tiny random Llama
saved with ``save_pretrained`` next to a word-level tokenizer (every id decodes to a word), served by
a real server process and called with the official ``openai`` client. The answers equal the
library's own greedy ``generate`` on the same directory (the base, a LoRA adapter and a prompt-tuning
adapter), and the model list names the directory."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import save_adapter
from serve_process import serve_process
from tiny_dirs import tiny_model_dir

import peftlab
from peftlab.zoo import load, tiny_model

openai = pytest.importorskip("openai")  # the dev extra; the server's own deps are fastapi and uvicorn

PROMPTS = ["the movie is", "one two", "a bad plot was good"]
ADAPTERS = {"lora": "lora[r=2,targets=q_proj|v_proj]", "soft": "prompt[length=3,init=random]"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-dir")
    directory = tiny_model_dir(root, "llama", "causal-lm", every_id=True)
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        save_adapter(tiny_model("llama", "causal-lm"), spec, root / "adapters" / name, seed=5 + i, std=2.0)
    with serve_process(["--model", str(directory), "--adapters", str(root / "adapters")], root / "server.log") as srv:
        yield srv, directory, root / "adapters"


def _library_text(directory, adapter_dir, prompt: str, max_tokens: int) -> str:
    model, tokenizer = load(str(directory), task="causal-lm")
    net = peftlab.load(model, adapter_dir).eval() if adapter_dir is not None else model
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = net.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # a completion is the text that follows the prompt's (here: a space, then the words)
    return tokenizer.decode(out[0], skip_special_tokens=True)[len(tokenizer.decode(ids, skip_special_tokens=True)):]


def test_a_local_model_directory_is_served_through_the_openai_client(served):
    server, directory, adapters = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    base = directory.name
    assert [m.id for m in client.models.list().data] == [base, *ADAPTERS]
    texts = {}
    for model in (base, *ADAPTERS):
        out = client.completions.create(model=model, prompt=PROMPTS, max_tokens=10, temperature=0)
        texts[model] = [c.text for c in out.choices]
        adapter_dir = None if model == base else adapters / model
        assert texts[model] == [_library_text(directory, adapter_dir, p, 10) for p in PROMPTS], model
        assert out.model == model and all(t.strip() for t in texts[model])
    assert texts[base] != texts["lora"] and texts[base] != texts["soft"]  # the adapters change the answers
    streamed = client.completions.create(model="soft", prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == texts["soft"][0]
    assert server.proc.poll() is None
