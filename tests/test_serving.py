"""The OpenAI-compatible server, over real HTTP on loopback: the official client, raw requests, bad input."""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import socket
import struct
import time
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from qlora_guide import deployment
from qlora_guide.deployment import serving
from qlora_guide.deployment.serving import TextAssembler, make_server
from qlora_guide.errors import QLoRAGuideError

KEY = "test-key"
MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def lm(model_cache):
    # float32 on every CPU: there a batch's greedy answers are those of each request alone (bf16 rounds by batch shape)
    return deployment.load_any(MODEL, dtype="float32")


@pytest.fixture(scope="module")
def server(lm):
    with make_server(lm, max_tokens_limit=32, default_max_tokens=8, max_body_bytes=64 * 1024, context_length=256, api_key=KEY) as srv:
        srv.start()
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def post(server, path, body, key=KEY, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return requests.post(server.url + path, data=data, headers=headers, timeout=120, **kwargs)


def local_greedy_ids(lm, messages, max_tokens):
    ids = deployment.chat_input_ids(lm.tokenizer, messages)
    with lm.lock:
        return deployment.greedy_ids(lm.model, ids, max_tokens)


def local_greedy(lm, messages=None, prompt=None, max_tokens=8):
    """What the model answers greedily without the server, as text, and its token count."""
    import torch

    if messages is not None:
        ids = deployment.chat_input_ids(lm.tokenizer, messages)
    else:
        ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    with lm.lock:
        new = deployment.greedy_ids(lm.model, ids, max_tokens)
    return lm.tokenizer.decode(new, skip_special_tokens=True), len(new), ids.shape[1]


def assert_error(response, status, code=None, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


# ------------------------------------------------------------------ the happy paths


def test_binds_loopback_and_lists_the_one_model(server, client):
    assert server.host == "127.0.0.1"
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = requests.get(server.url.removesuffix("/v1") + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_chat_completion_is_the_models_greedy_answer(client, lm):
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    text, tokens, prompt_tokens = local_greedy(lm, QUESTION, max_tokens=8)
    assert answer.choices[0].message.content == text and "Paris" in text
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == prompt_tokens and answer.usage.completion_tokens == tokens
    assert answer.usage.total_tokens == prompt_tokens + tokens
    ended = tokens < 8 or local_greedy_ids(lm, QUESTION, 8)[-1] == lm.tokenizer.eos_token_id
    assert answer.choices[0].finish_reason == ("stop" if ended else "length")
    assert answer.object == "chat.completion" and answer.model == MODEL and answer.id.startswith("chatcmpl-")


def test_chat_streaming_gives_the_same_text_in_pieces(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert sum(1 for p in pieces if p) >= 2, "the answer arrives in several events"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_completions_continue_plain_text(client, lm):
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert whole.choices[0].text == local_greedy(lm, prompt=prompt, max_tokens=6)[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True))
    assert streamed == whole.choices[0].text
    ids = lm.tokenizer(prompt)["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == whole.choices[0].text


def test_raw_server_sent_events(server):
    body = json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 6, "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(server.url + "/chat/completions", data=body, headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_cut_the_answer_and_are_never_sent(client, lm):
    text, _, _ = local_greedy(lm, QUESTION, max_tokens=8)
    stop = "France"
    assert stop in text
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0, stop=[stop, "zzz"])
    assert answer.choices[0].message.content == text[: text.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=8, temperature=0, stop=stop, stream=True) if c.choices]
    assert "".join(pieces) == answer.choices[0].message.content  # nothing of the stop string was sent


def test_text_assembler_holds_back_partial_stops_and_characters(lm):
    tokenizer = lm.tokenizer
    ids = tokenizer("Le café est à Paris.", add_special_tokens=False)["input_ids"]
    assembler = TextAssembler(tokenizer, stop=["Paris"])
    sent = [assembler.add(i) for i in ids]
    assert "".join(sent) + assembler.finish() == "Le café est à "
    assert all("\ufffd" not in piece for piece in sent)
    free = TextAssembler(tokenizer, stop=[])
    assert "".join(free.add(i) for i in ids) + free.finish() == "Le café est à Paris."


def test_concurrent_requests_get_the_same_answers_as_sequential_ones(client):
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Qu'est-ce que Paris ?"]

    def ask(question, stream=False):
        messages = [{"role": "user", "content": question}]
        if stream:
            chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0).choices[0].message.content

    sequential = [ask(q) for q in questions]
    jobs = [(q, i % 2 == 1) for i, q in enumerate(questions * 2)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        concurrent = list(pool.map(lambda job: ask(*job), jobs))
    assert concurrent == sequential * 2


def test_concurrent_greedy_requests_are_batched_and_answer_as_each_alone(server, lm):
    """Requests that arrive while the model is busy are generated in one batch, each row ending on its own."""
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Qu'est-ce que Paris ?",
                 "Who wrote Les Misérables?", "Say hello.", "What is QLoRA?", "Count to three."]
    limits = [3, 8, 5, 8, 2, 8, 6, 4]  # rows of one batch stop at different lengths
    alone = [local_greedy(lm, [{"role": "user", "content": q}], max_tokens=n)[0] for q, n in zip(questions, limits, strict=True)]
    sized = len(server.app.engine.batches)
    long = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 32, "temperature": 0}
    with ThreadPoolExecutor(max_workers=len(questions) + 1) as pool:
        first = pool.submit(post, server, "/completions", long)  # keeps the model busy while the others queue
        while not server.app.engine.busy:
            time.sleep(0.005)
        bodies = [{"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": n, "temperature": 0}
                  for q, n in zip(questions, limits, strict=True)]
        answers = list(pool.map(lambda body: post(server, "/chat/completions", body), bodies))
        assert first.result().status_code == 200
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == alone
    assert max(server.app.engine.batches[sized:]) >= 4, "the waiting requests were generated together"


def test_the_load_test_counts_every_request_and_token(server):
    from qlora_guide.deployment.load_test import chat_request, measure_clients

    questions = ["What is 2 + 2?", "Name a primary colour."]
    expected = [chat_request(server.url, MODEL, q, 4, api_key=KEY)["usage"]["completion_tokens"] for q in questions]
    figures = measure_clients(server.url, MODEL, clients=2, total=4, max_tokens=4, questions=questions, api_key=KEY)
    assert figures["requests"] == 4 and figures["completion_tokens"] == 2 * sum(expected)
    assert figures["tokens_per_s"] == pytest.approx(figures["completion_tokens"] / figures["wall_s"])
    assert 0 < figures["latency_p50_s"] <= figures["latency_p95_s"] <= figures["wall_s"]


def test_a_batch_takes_the_jobs_that_decode_alike_and_keeps_the_others_in_order():
    from collections import deque

    from qlora_guide.deployment.batching import take_batch
    from qlora_guide.deployment.engine import Job

    greedy = [Job([1], 4) for _ in range(3)]
    sampled = Job([1], 4, temperature=0.7)
    seeded = [Job([1], 4, temperature=0.7, seed=1), Job([1], 4, temperature=0.7, seed=1)]
    penalised = Job([1], 4, repetition_penalty=1.2)
    adapter = Job([1], 4, adapter="adapter1")  # another adapter decodes in the same pass
    waiting = deque([greedy[0], sampled, greedy[1], *seeded, penalised, greedy[2], adapter])
    assert take_batch(waiting, max_batch=3) == greedy
    assert list(waiting) == [sampled, *seeded, penalised, adapter]
    assert take_batch(waiting, max_batch=16) == [sampled]
    assert take_batch(waiting, max_batch=16) == [seeded[0]]  # a seed gives the same answer only alone
    assert take_batch(waiting, max_batch=16) == [seeded[1]]
    assert take_batch(waiting, max_batch=16) == [penalised]
    assert take_batch(waiting, max_batch=16) == [adapter] and not waiting


# ------------------------------------------------------------------ bad input


GOOD = {"model": MODEL, "messages": QUESTION, "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"),
    [
        ("/chat/completions", b"{oops", 400, "invalid_json", None),
        ("/chat/completions", b"[1, 2]", 400, "invalid_json", None),
        ("/chat/completions", b"\xff\xfe{}", 400, "invalid_json", None),
        ("/chat/completions", {**GOOD, "model": "gpt-4"}, 404, "model_not_found", "model"),
        ("/chat/completions", {"messages": QUESTION}, 400, "missing_required_parameter", "model"),
        ("/chat/completions", {**GOOD, "model": 3}, 400, "invalid_type", "model"),
        ("/chat/completions", {**GOOD, "max_tokens": -5}, 400, "invalid_value", "max_tokens"),
        ("/chat/completions", {**GOOD, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        ("/chat/completions", {**GOOD, "max_tokens": 10**12}, 400, "invalid_value", "max_tokens"),
        ("/chat/completions", {**GOOD, "max_completion_tokens": 33}, 400, "invalid_value", "max_completion_tokens"),
        ("/chat/completions", {**GOOD, "max_tokens": "8"}, 400, "invalid_type", "max_tokens"),
        ("/chat/completions", {**GOOD, "max_tokens": True}, 400, "invalid_type", "max_tokens"),
        ("/chat/completions", {**GOOD, "max_tokens": 2.5}, 400, "invalid_type", "max_tokens"),
        ("/chat/completions", {**GOOD, "messages": "hello"}, 400, "invalid_type", "messages"),
        ("/chat/completions", {**GOOD, "messages": []}, 400, "invalid_value", "messages"),
        ("/chat/completions", {k: v for k, v in GOOD.items() if k != "messages"}, 400, "missing_required_parameter", "messages"),
        ("/chat/completions", {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", "messages[0].role"),
        ("/chat/completions", {**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_type", "messages[0].content"),
        ("/chat/completions", {**GOOD, "messages": ["hi"]}, 400, "invalid_type", "messages[0]"),
        ("/chat/completions", {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "invalid_content", None),
        ("/chat/completions", {**GOOD, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "context_length_exceeded", "messages"),
        ("/chat/completions", {**GOOD, "max_tokens": 30, "messages": [{"role": "user", "content": "word " * 220}]}, 400, "context_length_exceeded", "messages"),
        ("/chat/completions", {**GOOD, "temperature": -1}, 400, "invalid_value", "temperature"),
        ("/chat/completions", {**GOOD, "temperature": 3}, 400, "invalid_value", "temperature"),
        ("/chat/completions", {**GOOD, "temperature": "hot"}, 400, "invalid_type", "temperature"),
        ("/chat/completions", {**GOOD, "top_p": 0}, 400, "invalid_value", "top_p"),
        ("/chat/completions", {**GOOD, "n": 2}, 400, "invalid_value", "n"),
        ("/chat/completions", {**GOOD, "stream": "yes"}, 400, "invalid_type", "stream"),
        ("/chat/completions", {**GOOD, "stop": [1]}, 400, "invalid_type", "stop"),
        ("/chat/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
        ("/chat/completions", {**GOOD, "logprobs": True}, 400, "unsupported_parameter", "logprobs"),
        ("/chat/completions", {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter", "tools"),
        ("/chat/completions", {**GOOD, "stream_options": "yes", "stream": True}, 400, "invalid_type", "stream_options"),
        ("/completions", {"model": MODEL, "max_tokens": 2}, 400, "missing_required_parameter", "prompt"),
        ("/completions", {"model": MODEL, "prompt": 5}, 400, "invalid_type", "prompt"),
        ("/completions", {"model": MODEL, "prompt": ""}, 400, "invalid_value", "prompt"),
        ("/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "invalid_type", "prompt"),
        ("/completions", {"model": MODEL, "prompt": [1, 10**9]}, 400, "invalid_value", "prompt"),
        ("/completions", {"model": MODEL, "prompt": "Hi", "echo": True}, 400, "unsupported_parameter", "echo"),
        ("/completions", {"model": MODEL, "prompt": "Hi", "best_of": 3}, 400, "unsupported_parameter", "best_of"),
        ("/completions", {"model": "nope", "prompt": "Hi"}, 404, "model_not_found", "model"),
    ],
)
def test_bad_requests_get_openai_style_errors(server, path, body, status, code, param):
    assert_error(post(server, path, body), status, code, param)


def test_http_level_errors_and_the_server_survives(server, client):
    assert_error(post(server, "/chat/completions", b" " * (100 * 1024)), 413, "request_too_large")
    assert_error(post(server, "/chat/completions", GOOD, key=None), 401, "invalid_api_key")
    assert_error(post(server, "/chat/completions", GOOD, key="wrong"), 401, "invalid_api_key")
    assert_error(requests.get(server.url + "/models", timeout=30), 401, "invalid_api_key")
    assert_error(post(server, "/embeddings", GOOD), 404, "not_found")
    assert_error(requests.delete(server.url + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30), 405, "method_not_allowed")
    assert_error(requests.get(server.url + "/models/gpt-4", headers={"Authorization": f"Bearer {KEY}"}, timeout=30), 404, "model_not_found")

    def raw(headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
        connection.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
        for name, value in {"Authorization": f"Bearer {KEY}", **headers}.items():
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        result = response.status, response.read()
        connection.close()
        return result

    status, body = raw({})  # no Content-Length: an empty body
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, body = raw({"Transfer-Encoding": "chunked"}, b"2\r\n{}\r\n0\r\n\r\n")  # chunked bodies are read, and checked
    assert status == 400 and json.loads(body)["error"]["code"] == "missing_required_parameter"
    big = b" " * (70 * 1024)
    status, body = raw({"Transfer-Encoding": "chunked"}, b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big))
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert raw({"Content-Length": "-4"})[0] == 400  # refused by the HTTP server itself
    assert raw({"Content-Length": "abc"})[0] == 400

    # after all that, the server still answers, on a fresh connection and on a kept-alive one
    assert requests.get(server.url.removesuffix("/v1") + "/health", timeout=30).status_code == 200
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {KEY}"
        assert session.post(server.url + "/chat/completions", data=b"{bad", timeout=60).status_code == 400
        assert session.post(server.url + "/chat/completions", json=GOOD, timeout=60).json()["choices"][0]["message"]["content"]
    assert client.chat.completions.create(**GOOD).choices[0].message.content


def test_the_openai_client_sees_typed_errors(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=-1)
    assert bad.value.code == "invalid_value" and bad.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=2)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 400}], max_tokens=4)
    assert long.value.code == "context_length_exceeded" and "maximum context length is 256" in long.value.message


def test_a_client_that_leaves_mid_stream_does_not_block_the_others(server, client):
    body = json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 32, "temperature": 0, "stream": True}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {server.host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(head + body)
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    assert answer.choices[0].message.content


def test_the_bearer_scheme_is_case_insensitive_and_the_key_compared_in_constant_time(server, monkeypatch):
    compared = []
    real = serving.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(serving.hmac, "compare_digest", spy)
    for scheme in ("bearer", "BEARER", "Bearer"):
        response = requests.get(server.url + "/models", headers={"Authorization": f"{scheme} {KEY}"}, timeout=30)
        assert response.status_code == 200, response.text
    assert_error(requests.get(server.url + "/models", headers={"Authorization": f"Basic {KEY}"}, timeout=30), 401, "invalid_api_key")
    assert_error(requests.get(server.url + "/models", headers={"Authorization": "bearer"}, timeout=30), 401, "invalid_api_key")
    assert len(compared) >= 4 and all(b == KEY.encode() for _, b in compared)


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/chat/completions", {"temperature": -0.5}, "temperature"),
        ("/chat/completions", {"temperature": 2.5}, "temperature"),
        ("/chat/completions", {"top_p": 1.5}, "top_p"),
        ("/chat/completions", {"top_p": -0.1}, "top_p"),
        ("/chat/completions", {"temperature": True}, "temperature"),
        ("/chat/completions", {"seed": "x"}, "seed"),
        ("/completions", {"temperature": -1}, "temperature"),
        ("/completions", {"top_p": 0}, "top_p"),
    ],
)
def test_out_of_range_sampling_is_a_400_not_a_500(server, path, extra, param):
    body = {**GOOD, **extra} if path == "/chat/completions" else {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **extra}
    error = assert_error(post(server, path, body), 400, param=param)
    assert error["code"] in ("invalid_value", "invalid_type") and param in error["message"]


@pytest.mark.parametrize(
    ("content_type", "data"),
    [
        ("text/plain", json.dumps(GOOD)),
        ("application/x-www-form-urlencoded", "model=smollm2-135m&max_tokens=2"),
        ("multipart/form-data; boundary=x", "--x--"),
    ],
)
def test_a_body_that_is_not_json_is_refused(server, content_type, data):
    response = requests.post(server.url + "/chat/completions", data=data.encode(),
                             headers={"Content-Type": content_type, "Authorization": f"Bearer {KEY}"}, timeout=30)
    assert_error(response, 415, "unsupported_media_type")
    ok = requests.post(server.url + "/chat/completions", data=json.dumps(GOOD).encode(),
                       headers={"Content-Type": "application/json; charset=utf-8", "Authorization": f"Bearer {KEY}"}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_validation_errors_are_openai_400s_never_fastapi_422s(server):
    for body in ({**GOOD, "messages": [{"role": "user"}]}, {**GOOD, "stream_options": {"include_usage": "yes"}, "stream": True}):
        response = post(server, "/chat/completions", body)
        assert response.status_code == 400 and "detail" not in response.json()
        assert_error(response, 400)
    assert_error(post(server, "/chat/completions", {**GOOD, "messages": [{"role": "user"}]}), 400, param="messages[0].content")


@pytest.mark.parametrize(("host", "warns"), [
    ("127.0.0.1", False), ("127.0.0.2", False), ("::1", False), ("localhost", False), ("0.0.0.0", True), ("192.168.1.7", True),
])
def test_the_network_warning_fires_only_off_loopback(monkeypatch, capsys, host, warns):
    class FakeServer:
        app = types.SimpleNamespace(lm=types.SimpleNamespace(kind="base", quantized=False), model_id=MODEL, served_ids=[MODEL])
        url = "http://x/v1"

        def __init__(self, bound):
            self.host = bound

        def serve_forever(self):
            raise KeyboardInterrupt

        def close(self):
            pass

    bound = {"localhost": "127.0.0.1"}.get(host, host)
    monkeypatch.setattr(serving, "make_server", lambda *a, **k: FakeServer(bound))
    serving.serve("unused", host=host, api_key="k")
    assert ("warning: listening on" in capsys.readouterr().err) is warns
    assert serving.is_loopback(host) is not warns


def leave_mid_stream(srv, body):
    """Send a streamed request on a raw socket, read until the first event, and hang up."""
    data = json.dumps({**body, "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection((srv.host, srv.port), timeout=60) as sock:
        sock.sendall(head + data)
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
        assert srv.app.engine.busy, "the long generation is under way when the client leaves"


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_client_leaves_is_cancelled(lm, monkeypatch, stream):
    from qlora_guide.deployment import batching

    tokens = []
    real_put = batching.RowsDone.put

    def counting_put(self, value):
        if self.prompt_seen:
            tokens.extend(value.reshape(-1).tolist())
        real_put(self, value)

    monkeypatch.setattr(batching.RowsDone, "put", counting_put)
    with make_server(lm, max_tokens_limit=4000, context_length=4096) as srv:
        srv.start()
        body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 4000, "temperature": 0}
        if stream:
            leave_mid_stream(srv, body)
        else:
            with pytest.raises(requests.exceptions.ReadTimeout):
                requests.post(srv.url + "/completions", json=body, timeout=3)
            assert srv.app.engine.busy, "the long generation is under way when the client leaves"
        assert tokens
        at_leave = len(tokens)
        deadline = time.monotonic() + 20
        while srv.app.engine.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not srv.app.engine.busy, "the generation of a client that left goes on"
        assert len(tokens) < 4000 and tokens[-1] not in srv.app.eos_ids  # cut short, not ended by itself
        assert len(tokens) - at_leave < 100, "the generation stops within a few tokens"
        started = time.monotonic()
        answer = requests.post(srv.url + "/completions", json={**body, "max_tokens": 4}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 4
        assert time.monotonic() - started < 15


def test_a_full_queue_is_a_503_before_any_work(lm):
    with make_server(lm, max_tokens_limit=4000, context_length=4096, max_queue=1) as srv:
        srv.start()
        long = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 4000, "temperature": 0}
        data = json.dumps({**long, "stream": True}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        with socket.create_connection((srv.host, srv.port), timeout=60) as running, ThreadPoolExecutor(1) as pool:
            running.sendall(head + data)
            while b"data: " not in running.recv(4096):
                pass
            waiting = pool.submit(requests.post, srv.url + "/completions", json={**long, "max_tokens": 3}, timeout=120)
            deadline = time.monotonic() + 30
            while srv.app.engine.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            error = assert_error(requests.post(srv.url + "/completions", json={**long, "max_tokens": 3}, timeout=30), 503, "server_busy")
            assert error["type"] == "server_error"
            running.close()  # the running stream ends, the waiting request gets its turn
            assert waiting.result().status_code == 200


def test_clients_that_leave_before_an_error_do_not_fill_the_log(server, client):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    keep = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "qlora_guide")]
    for logger in loggers:
        logger.addHandler(keep)
    try:
        for head in (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\nAuthorization: Bearer {KEY}\r\n\r\n",
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nAuthorization: Bearer {KEY}\r\n\r\n{{bad",
            "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            for _ in range(3):
                with socket.create_connection((server.host, server.port), timeout=30) as sock:
                    sock.sendall(head.encode())
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, do not read
        assert client.chat.completions.create(**GOOD).choices[0].message.content
    finally:
        for logger in loggers:
            logger.removeHandler(keep)
    assert not [r for r in records if r.exc_info or "Traceback" in r.getMessage()]


def test_port_in_use_is_a_one_line_error(lm):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(QLoRAGuideError, match="cannot listen on 127.0.0.1:"):
            make_server(lm, port=taken.getsockname()[1])


# ------------------------------------------------------------------ an adapter folder


@pytest.mark.slow
def test_serves_an_adapter_folder(tmp_path):
    from test_deployment import make_adapter_run

    run = make_adapter_run(tmp_path / "faq-adapter")
    with make_server(run, max_tokens_limit=8) as srv:
        srv.start()
        assert srv.app.lm.kind == "adapter" and srv.app.lm.quantized
        adapter_client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in adapter_client.models.list().data] == ["faq-adapter", MODEL]  # the adapter, and its base alone
        answer = adapter_client.chat.completions.create(model="faq-adapter", messages=QUESTION, max_tokens=6, temperature=0)
        assert answer.choices[0].message.content == local_greedy(srv.app.lm, QUESTION, max_tokens=6)[0]


@pytest.mark.slow
def test_serves_several_adapters_on_one_base_each_by_its_name(tmp_path):
    from test_deployment import make_adapter_run

    from qlora_guide.config import QuantizationConfig
    from qlora_guide.deployment.generation import chat_input_ids, generate_ids

    runs = [make_adapter_run(tmp_path / "adapter-a", seed=0, scale=0.6), make_adapter_run(tmp_path / "adapter-b", seed=1, scale=0.6)]
    float32 = QuantizationConfig(bnb_4bit_compute_dtype="float32")  # batch-invariant greedy answers on every CPU
    with make_server(runs, max_tokens_limit=16, quantization=float32) as srv:
        srv.start()
        lm = srv.app.lm
        assert lm.kind == "adapters" and lm.quantized
        assert sorted(lm.model.peft_config) == ["adapter1", "default"]  # one base, two sets of LoRA weights
        several = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
        names = ["adapter-a", "adapter-b", MODEL]
        assert [m.id for m in several.models.list().data] == names

        def ask(name):
            answer = several.chat.completions.create(model=name, messages=QUESTION, max_tokens=12, temperature=0)
            assert answer.model == name
            return answer.choices[0].message.content

        alone = {name: ask(name) for name in names}
        assert len(set(alone.values())) == 3, f"the two adapters and the base answer alike: {alone}"
        ids = chat_input_ids(lm.tokenizer, QUESTION)
        with lm.lock, lm.model.disable_adapter():
            base = generate_ids(lm.model, ids, max_new_tokens=12, tokenizer=lm.tokenizer)[0]
        assert alone[MODEL] == lm.tokenizer.decode(base, skip_special_tokens=True)
        sized = len(srv.app.engine.batches)
        with ThreadPoolExecutor(max_workers=9) as pool:
            mixed = list(pool.map(ask, names * 3))
        assert mixed == [alone[name] for name in names] * 3
        assert max(srv.app.engine.batches[sized:]) > 1, "requests for different adapters shared a batch"
        error = assert_error(post(srv, "/chat/completions", {**GOOD, "model": "adapter-c"}, key=None), 404, "model_not_found", "model")
        assert "'adapter-a', 'adapter-b', 'smollm2-135m'" in error["message"]


def test_several_models_are_refused_unless_adapters_of_one_base(tmp_path):
    from test_deployment import make_adapter_run

    run = make_adapter_run(tmp_path / "one" / "faq")
    twin = tmp_path / "two" / "faq"
    twin.parent.mkdir()
    twin.symlink_to(run, target_is_directory=True)
    with pytest.raises(QLoRAGuideError, match="two adapters are both served as 'faq'"):
        make_server([run, twin])
    with pytest.raises(QLoRAGuideError, match="smollm2-135m is not an adapter folder"):
        make_server([run, MODEL])
    other = tmp_path / "mistral-faq"
    shutil.copytree(run, other)
    (other / "manifest.json").write_text(json.dumps({"base_model": "mistralai/Mistral-7B-v0.1"}))
    with pytest.raises(QLoRAGuideError, match="was trained on 'mistralai/Mistral-7B-v0.1' and .* on 'smollm2-135m': one server holds one base"):
        make_server([run, other])  # refused before any model is loaded: this base is not on this machine
    (tmp_path / "empty").mkdir()
    with pytest.raises(QLoRAGuideError, match="empty is neither a model folder"):
        make_server([run, tmp_path / "empty"])
