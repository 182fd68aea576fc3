"""``peftlab serve`` as its users see it: a real server process (``python -m peftlab serve`` on a free
port, the real SmolLM2, small LoRA adapters made here) called with the official ``openai`` client
unchanged and with plain HTTP (urllib).

Checked: completions, chat (the chat template), streaming (OpenAI's chunks, ``data: [DONE]``) and the
model list through the client; the load/unload routes with vLLM's bodies; every error's status and
OpenAI shape (404, 400 naming the field, 400 for a prompt longer than the context, 429 with
Retry-After) with the server still serving afterwards; adapters only from the allowed roots, only
safetensors; the API key on every route but /health; the Prometheus metrics; responses under
concurrent load and adapter loading/unloading equal to lone runs of the same requests; and that
the adapter files the server reads load in Hugging Face PEFT with the same outputs.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab import zoo
from conftest import randomize_adapter
from serve_process import Server, serve_process

openai = pytest.importorskip("openai")  # the dev extra; the server's own deps are fastapi and uvicorn

KEY = "test-key-1234"
LORA = "lora[r=4,alpha=8,targets=q_proj|v_proj]"
PROMPTS = ["The capital of France is", "Once upon a time"]
MAX_BATCH, MAX_QUEUE = 4, 4


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = zoo.load("smollm2")
    return model.eval(), tokenizer


def _save_adapters(model, paths: dict[str, Path]) -> None:
    """LoRA r4 on q,v adapters with every factor moved off its init (so B != 0 and they differ), one
    per ``{name: directory}``."""
    pm = peftlab.apply(copy.deepcopy(model), LORA, adapter_name=next(iter(paths)))
    for seed, (name, path) in enumerate(paths.items(), start=1):
        if name not in pm.adapters:
            pm.add_adapter(name, LORA)
        randomize_adapter(pm, name, std=0.12, seed=seed)
        pm.save(str(path), adapter_name=name)


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2) -> dict[str, Path]:
    """adapters/{alpha,beta} (registered at start), extra/gamma (loadable: an allowed root),
    outside/delta (not under a root), extra/link -> outside/delta, extra/pickled (a .bin only)."""
    model, _ = smollm2
    root = tmp_path_factory.mktemp("serve")
    paths = {"adapters": root / "adapters", "extra": root / "extra", "outside": root / "outside"}
    for name, folder in (("alpha", "adapters"), ("beta", "adapters"), ("gamma", "extra"), ("delta", "outside")):
        paths[name] = paths[folder] / name
    _save_adapters(model, {name: paths[name] for name in ("alpha", "beta", "gamma", "delta")})
    paths["link"] = paths["extra"] / "link"
    paths["link"].symlink_to(paths["delta"], target_is_directory=True)
    paths["pickled"] = paths["extra"] / "pickled"
    paths["pickled"].mkdir()
    (paths["pickled"] / "adapter_config.json").write_text((paths["gamma"] / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    torch.save(load_file(str(paths["gamma"] / "adapter_model.safetensors")), paths["pickled"] / "adapter_model.bin")
    return paths


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    args = ["--model", "smollm2", "--adapters", str(files["adapters"]), "--adapter-roots", str(files["extra"]),
            "--api-key", KEY, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE)]
    with serve_process(args, log, key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def lone(server) -> dict[tuple[str, str], str]:
    """Each (model, prompt)'s greedy text, each request sent alone (nothing else in flight)."""
    return {(m, p): server.complete(m, p) for m in ("smollm2", "alpha", "beta") for p in PROMPTS}


# -- the openai client ---------------------------------------------------------------------------------
def test_models_list_names_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"smollm2", "alpha", "beta"}
    assert models["alpha"].model_extra["parent"] == "smollm2" and models["smollm2"].model_extra["parent"] is None


def test_completion_routes_by_model_field(client, lone):
    out = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.model == "alpha" and len(out.choices) == 1
    assert out.choices[0].text == lone[("alpha", PROMPTS[0])]
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    texts = {m: lone[(m, PROMPTS[0])] for m in ("smollm2", "alpha", "beta")}
    assert len(set(texts.values())) == 3, texts  # the adapters really change the output


def test_chat_goes_through_the_chat_template(client, server, smollm2):
    _, tokenizer = smollm2
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="beta", messages=messages, max_tokens=6, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)
    assert chat.choices[0].message.content == server.complete("beta", rendered, max_tokens=6)


def test_streams_equal_whole_responses(client, lone):
    chunks = list(client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == lone[("beta", PROMPTS[1])]
    assert [c.choices[0].finish_reason for c in chunks][-1] in ("length", "stop")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "Say hello."}]
    whole = client.chat.completions.create(model="alpha", messages=messages, max_tokens=6, temperature=0)
    stream = list(client.chat.completions.create(model="alpha", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].object == "chat.completion.chunk" and stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole.choices[0].message.content
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_event_stream_ends_with_done(server):
    status, headers, text = server.http("POST", "/v1/completions", {"model": "smollm2", "prompt": PROMPTS[0],
                                                                    "max_tokens": 3, "temperature": 0, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [block for block in text.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])


def test_wrong_key_is_refused_by_the_client(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# -- errors ----------------------------------------------------------------------------------------------
def test_errors_have_status_shape_and_field(server, lone):
    status, err, _ = server.error("POST", "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and err["code"] == "model_not_found" and "nope" in err["message"]
    status, err, _ = server.error("POST", "/v1/completions", raw=b'{"model": "alpha", "prompt": ')
    assert status == 400 and "malformed JSON" in err["message"]
    status, err, _ = server.error("POST", "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": -1})
    assert status == 400 and err["param"] == "max_tokens" and "max_tokens" in err["message"]
    status, err, _ = server.error("POST", "/v1/completions", {"model": "alpha"})
    assert status == 400 and err["param"] == "prompt"
    status, err, _ = server.error("POST", "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "robot", "content": "x"}]})
    assert status == 400 and err["param"] == "messages.0.role"
    status, err, _ = server.error("POST", "/v1/completions", {"model": "alpha", "prompt": "x", "logprobs": 2})
    assert status == 400 and err["param"] == "logprobs"
    status, err, _ = server.error("POST", "/v1/completions", {"model": "alpha", "prompt": "hello " * 9000, "max_tokens": 1})
    assert status == 400 and err["code"] == "context_length_exceeded" and "8192" in err["message"]
    status, err, _ = server.error("GET", "/v1/nothing")
    assert status == 404
    assert server.complete("alpha", PROMPTS[0]) == lone[("alpha", PROMPTS[0])]  # still serving, same answer


def test_full_queue_answers_429_with_retry_after(server, lone):
    body = {"model": "alpha", "prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0}
    results: list[tuple[int, dict[str, str], str]] = []
    start = threading.Barrier(2 * (MAX_BATCH + MAX_QUEUE))

    def send() -> None:
        start.wait()
        results.append(server.http("POST", "/v1/completions", body))

    threads = [threading.Thread(target=send) for _ in range(start.parties)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(s for s, _, _ in results)
    assert statuses.count(200) >= MAX_BATCH and statuses.count(429) >= 1 and set(statuses) == {200, 429}, statuses
    for status, headers, text in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and json.loads(text)["error"]["code"] == "queue_full"
    assert server.complete("alpha", PROMPTS[0]) == lone[("alpha", PROMPTS[0])]


def test_api_key_guards_every_route_but_health(server):
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/metrics", None),
                               ("POST", "/v1/completions", {"model": "alpha", "prompt": "x"}),
                               ("POST", "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "x"}]}),
                               ("POST", "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": "/tmp"}),
                               ("POST", "/v1/unload_lora_adapter", {"lora_name": "alpha"})):
        for key in (None, "wrong"):
            status, err, headers = server.error(method, path, body, key=key)
            assert status == 401 and err["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer", path
    assert server.http("GET", "/health", key=None)[:1] == (200,)
    assert "alpha" in server.http("GET", "/v1/models")[2]  # nothing was unloaded without the key


# -- adapters at run time ----------------------------------------------------------------------------------
def test_load_and_unload_with_vllm_bodies(server, client, files):
    status, _, text = server.http("POST", "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(files["gamma"])})
    assert status == 200 and "gamma" in text
    assert "gamma" in {m.id for m in client.models.list().data}
    gamma = server.complete("gamma", PROMPTS[0])
    assert gamma not in (server.complete("alpha", PROMPTS[0]), server.complete("smollm2", PROMPTS[0]))
    status, _, text = server.http("POST", "/v1/unload_lora_adapter", {"lora_name": "gamma"})
    assert status == 200 and "gamma" in text
    status, err, _ = server.error("POST", "/v1/completions", {"model": "gamma", "prompt": "x"})
    assert status == 404
    status, err, _ = server.error("POST", "/v1/unload_lora_adapter", {"lora_name": "gamma"})
    assert status == 404
    status, err, _ = server.error("POST", "/v1/load_lora_adapter", {"lora_name": "gamma"})
    assert status == 400 and err["param"] == "lora_path"


@pytest.mark.parametrize("case", ["outside", "link", "dotdot", "pickled", "missing"])
def test_loading_only_safetensors_from_allowed_roots(server, files, case):
    path = {"outside": files["delta"], "link": files["link"], "pickled": files["pickled"],
            "dotdot": files["extra"] / ".." / "outside" / "delta", "missing": files["extra"] / "nothing"}[case]
    status, err, _ = server.error("POST", "/v1/load_lora_adapter", {"lora_name": f"bad_{case}", "lora_path": str(path)})
    assert status == 400, err
    expect = {"pickled": "pickle", "missing": "does not exist"}.get(case, "allowed")
    assert expect in err["message"], err
    assert f"bad_{case}" not in server.http("GET", "/v1/models")[2]


def test_in_flight_requests_equal_lone_runs_while_adapters_load_and_unload(server, files, lone):
    """Requests for the base and two adapters run concurrently while gamma is loaded and unloaded
    over and over: every answer equals the same request's lone answer."""
    jobs = [(m, p) for m in ("smollm2", "alpha", "beta") for p in PROMPTS]
    answers: dict[int, str] = {}
    errors: list[BaseException] = []
    done = threading.Event()

    def ask(i: int, model: str, prompt: str) -> None:
        try:
            for _ in range(2):
                answers[i] = answers.get(i, "") + "|" + server.complete(model, prompt)
        except BaseException as err:  # reported below
            errors.append(err)

    def churn() -> int:
        count = 0
        while not done.is_set():
            assert server.http("POST", "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(files["gamma"])})[0] == 200
            assert server.http("POST", "/v1/unload_lora_adapter", {"lora_name": "gamma"})[0] == 200
            count += 1
        return count

    threads = [threading.Thread(target=ask, args=(i, m, p)) for i, (m, p) in enumerate(jobs)]
    for t in threads:
        t.start()
    cycles = []
    churner = threading.Thread(target=lambda: cycles.append(churn()))
    churner.start()
    for t in threads:
        t.join()
    done.set()
    churner.join()
    assert not errors, errors
    assert cycles and cycles[0] >= 1
    for i, (model, prompt) in enumerate(jobs):
        assert answers[i] == f"|{lone[(model, prompt)]}" * 2, (model, prompt)


# -- choices, lists of prompts, clients that go away ---------------------------------------------------------
def test_n_choices_are_the_requests_seeded_seed_plus_index(client, server):
    """``n`` > 1: n choices, index 0..n-1, choice i sampled with seed + i (the n = 1 answer of that seed),
    streamed per index too; more than 16 choices in one call is a 400 naming ``n``."""
    # top_p = 0.5: a draw among 49k tokens of tiny probability can flip with the batch's float rounding
    ask = dict(model="alpha", prompt=PROMPTS[1], max_tokens=6, temperature=1.0, top_p=0.5)
    many = client.completions.create(n=3, seed=11, **ask)
    assert [c.index for c in many.choices] == [0, 1, 2]
    singles = [client.completions.create(seed=11 + i, **ask).choices[0].text for i in range(3)]
    assert [c.text for c in many.choices] == singles
    assert len(set(singles)) > 1  # the seeds really differ
    chunks = list(client.completions.create(n=2, seed=11, stream=True, **ask))
    joined = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in (0, 1)}
    assert joined == {0: singles[0], 1: singles[1]}
    for body, says in (({"n": 17}, "n=17"), ({"prompt": ["a", "b", "c", "d"], "n": 5}, "4 prompts x n=5")):
        status, err, _ = server.error("POST", "/v1/completions", {"model": "alpha", "prompt": "x", **body})
        assert status == 400 and err["param"] == "n" and ("16" in err["message"] or says in err["message"]), err


def test_a_list_of_prompts_gives_one_choice_per_prompt_and_n(client, server, lone, smollm2):
    _, tokenizer = smollm2
    texts = client.completions.create(model="beta", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [(c.index, c.text) for c in texts.choices] == [(i, lone[("beta", p)]) for i, p in enumerate(PROMPTS)]
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    assert texts.usage.prompt_tokens == sum(map(len, ids))
    by_ids = client.completions.create(model="beta", prompt=ids, max_tokens=8, temperature=0, n=2)  # prompt-major
    assert [c.text for c in by_ids.choices] == [lone[("beta", p)] for p in PROMPTS for _ in range(2)]
    one = client.completions.create(model="beta", prompt=ids[1], max_tokens=8, temperature=0)  # one list of ids
    assert [c.text for c in one.choices] == [lone[("beta", PROMPTS[1])]]
    for prompt in ([], [PROMPTS[0], ""]):
        status, err, _ = server.error("POST", "/v1/completions", {"model": "beta", "prompt": prompt})
        assert status == 400 and err["param"] == "prompt", err


def _stream_and_hang_up(server: Server, body: dict) -> socket.socket:
    """A raw HTTP/1.1 streaming request on its own socket, read until its first data chunk; the
    socket is returned open (the caller closes it: the client goes away mid-stream)."""
    address = urllib.parse.urlsplit(server.url)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((address.hostname, address.port), timeout=300)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {address.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    received = b""
    while b"data: {" not in received:
        more = sock.recv(4096)
        assert more, f"the server closed the stream before its first chunk: {received!r}"
        received += more
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock


def test_a_client_that_hangs_up_mid_stream_frees_its_batch_rows(server, lone):
    """MAX_BATCH streams of 4000 tokens fill the batch; their clients close the sockets after the first
    chunk: every request is cancelled (its row freed at the next step) and the server answers the
    next request as before."""
    before = _metrics(server)
    body = {"model": "beta", "prompt": PROMPTS[0], "max_tokens": 4000, "temperature": 0, "stream": True}
    sockets = [_stream_and_hang_up(server, body) for _ in range(MAX_BATCH)]
    assert _metrics(server)["peftlab_running_requests"] == MAX_BATCH  # all four rows decoding together
    for sock in sockets:
        sock.close()
    deadline = time.monotonic() + 120
    while True:
        now = _metrics(server)
        cancelled = now["peftlab_requests_cancelled_total"] - before["peftlab_requests_cancelled_total"]
        if now["peftlab_running_requests"] == 0 and cancelled == MAX_BATCH:
            break
        assert time.monotonic() < deadline, f"rows not freed: {now['peftlab_running_requests']} running, {cancelled} cancelled"
        time.sleep(0.5)
    generated = now["peftlab_engine_tokens_generated_total"] - before["peftlab_engine_tokens_generated_total"]
    assert generated < MAX_BATCH * 4000 / 10  # stopped long before their max_tokens
    assert server.complete("beta", PROMPTS[0]) == lone[("beta", PROMPTS[0])]
    assert server.proc.poll() is None


# -- metrics ---------------------------------------------------------------------------------------------------
SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})? -?[0-9.e+-]+$')


def _metrics(server: Server) -> dict[str, float]:
    status, headers, text = server.http("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$", line), line
            continue
        assert SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def test_metrics_in_prometheus_text(server):
    before = _metrics(server)
    for name in ("peftlab_queue_length", "peftlab_batch_size", "peftlab_tokens_per_second", "peftlab_running_requests",
                 "peftlab_adapter_cache_hits_total", "peftlab_adapter_cache_misses_total", "peftlab_requests_done_total",
                 "peftlab_adapters_registered"):
        assert name in before, name
    not_found = 'peftlab_http_requests_total{route="/v1/completions",status="404"}'
    ok = 'peftlab_http_requests_total{route="/v1/completions",status="200"}'
    server.error("POST", "/v1/completions", {"model": "nope", "prompt": "x"})
    server.complete("alpha", PROMPTS[0], max_tokens=2)
    after = _metrics(server)
    assert after[not_found] == before.get(not_found, 0) + 1 and after[ok] == before.get(ok, 0) + 1
    assert after["peftlab_requests_done_total"] >= before["peftlab_requests_done_total"] + 1
    assert after["peftlab_generated_tokens_total"] >= before.get("peftlab_generated_tokens_total", 0) + 1
    assert after["peftlab_adapters_registered"] == 2
    assert after["peftlab_request_seconds_count"] == before["peftlab_request_seconds_count"] + 1


# -- beyond one machine: PEFT reads the same files ----------------------------------------------------------------
def test_served_adapter_files_load_in_peft_with_equal_outputs(smollm2, files, lone):
    """PeftModel.from_pretrained on the adapter directory the server serves: the same logits as
    peftlab.load, and the same greedy completion as the server's."""
    from peft import PeftModel

    model, tokenizer = smollm2
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = peftlab.load(copy.deepcopy(model), str(files["alpha"])).eval()
        theirs = PeftModel.from_pretrained(copy.deepcopy(model), str(files["alpha"])).eval()
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
        out = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
    assert diff < 1e-4
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text == lone[("alpha", PROMPTS[0])]


# -- the command line ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["--adapters", "/nonexistent/dir"], "--adapters /nonexistent/dir: not a directory"),
    (["--max-batch", "0"], "--max-batch 0: must be at least 1"),
    (["--adapter-roots", "/nonexistent/root"], "--adapter-roots /nonexistent/root: not a directory"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: expected a zoo name"),
])
def test_bad_arguments_are_one_line(argv, says, capsys):
    from peftlab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "0", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("peftlab: error: ") and says in err and err.count("\n") == 1
