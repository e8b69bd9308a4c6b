"""companion.serve: the OpenAI-compatible endpoint, queried over loopback with a real HTTP client.

Every expected token comes from :func:`companion.generation.static_cache.decode` on the same model (greedy, one
prompt alone), so the tests check that batching, streaming and cancelling change nothing in
what a request gets. Every socket has a timeout and every server is closed by its fixture, so
a failure fails, it never hangs.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import torch

from companion.generation.static_cache import decode
from companion.llama import Llama, LlamaConfig
from companion.serve import APIError, load_model_dir, parse_completion_request, server_from_args, start_server

NAME = "tiny"
TIMEOUT = 20.0  # seconds, for every socket and every wait: a broken server fails a test, never hangs it
CONFIG = LlamaConfig.preset("tiny")  # vocab 256, context 128
GOOD = {"model": NAME, "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}


def tiny_model(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    return Llama(replace(CONFIG, **overrides)).eval()


def solo(model, prompt: list[int], n: int, eos_token_id: int | None = None) -> list[int]:
    """The greedy tokens of ``prompt`` alone: the reference every served answer must equal."""
    out = decode(model, torch.tensor([prompt]), n, eos_token_id=eos_token_id)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def server(model):
    with start_server(model, model_name=NAME, block_size=8) as server:
        yield server


def request(server, method: str, path: str, body=None, *, timeout: float = TIMEOUT,
            connection: http.client.HTTPConnection | None = None):
    """``(status, headers, parsed JSON body)`` of one request; ``body`` is a dict, or raw bytes/str."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body is not None else {})
    response = conn.getresponse()
    data = response.read()
    if connection is None:
        conn.close()
    return response.status, dict(response.getheaders()), json.loads(data)


def complete(server, **fields):
    status, _, body = request(server, "POST", "/v1/completions", {"model": NAME, "temperature": 0, **fields})
    assert status == 200, body
    return body


def stream(server, **fields) -> list:
    """The parsed events of a streamed completion, ``"[DONE]"`` last."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps({"model": NAME, "temperature": 0, "stream": True,
                                                                 **fields}))
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert response.getheader("Content-Type") == "text/event-stream"
        return events_of(response.read().decode())
    finally:
        conn.close()


def events_of(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_for(predicate, what: str, deadline: float = TIMEOUT):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {deadline} s waiting for {what}")


def health(server) -> dict:
    status, _, body = request(server, "GET", "/health")
    assert status == 200
    return body


def slow_steps(server, seconds: float) -> None:
    """Make every engine step take at least ``seconds``, so a test can act in the middle of a request."""
    step = server.engine.step

    def slow():
        time.sleep(seconds)
        return step()

    server.engine.step = slow


# ---- answers ------------------------------------------------------------------------------------


def test_greedy_completion_equals_decode_of_the_prompt_alone(server, model):
    prompts = [[1, 2, 3], [7], list(range(40, 60))]
    expected = [solo(model, p, 12) for p in prompts]
    for prompt, tokens in zip(prompts, expected):
        body = complete(server, prompt=prompt, max_tokens=12)
        assert body["object"] == "text_completion" and body["model"] == NAME and body["id"].startswith("cmpl-")
        assert isinstance(body["created"], int)
        (choice,) = body["choices"]
        assert choice["token_ids"] == tokens
        assert (choice["index"], choice["text"], choice["logprobs"], choice["finish_reason"]) == (0, "", None, "length")
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12,
                                 "total_tokens": len(prompt) + 12}


def test_max_tokens_defaults_to_16_and_a_prompt_may_be_wrapped_in_a_list(server, model):
    body = complete(server, prompt=[[5, 6]])
    assert body["choices"][0]["token_ids"] == solo(model, [5, 6], 16)


def test_the_whole_context_can_be_used(server, model):
    prompt = [3] * 100
    body = complete(server, prompt=prompt, max_tokens=CONFIG.max_position_embeddings - 100)
    assert body["choices"][0]["token_ids"] == solo(model, prompt, 28)


def test_sampling_with_a_seed_repeats(server):
    fields = dict(prompt=[1, 2, 3], max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    first, second = complete(server, **fields), complete(server, **fields)
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"]
    assert all(0 <= t < CONFIG.vocab_size for t in first["choices"][0]["token_ids"])


def test_concurrent_streams_each_get_their_own_tokens(server, model):
    prompts = {i: list(range(1 + i, 4 + 5 * i)) for i in range(5)}  # lengths 3, 7, 11, 15, 19
    lengths = {i: 6 + 7 * i for i in prompts}  # different lengths: requests join and leave the batch
    expected = {i: solo(model, prompts[i], lengths[i]) for i in prompts}
    results, errors = {}, []

    def client(i):
        try:
            results[i] = stream(server, prompt=prompts[i], max_tokens=lengths[i])
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors and all(not t.is_alive() for t in threads), errors
    for i, events in results.items():
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert [c["choices"][0]["token_ids"] for c in chunks] == [[t] for t in expected[i]]  # one token a chunk
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (lengths[i] - 1) + ["length"]
        assert len({c["id"] for c in chunks}) == 1 and chunks[0]["object"] == "text_completion"
    assert len({events[0]["id"] for events in results.values()}) == len(prompts)


def test_streams_stay_exact_when_the_engine_preempts(model):
    prompts = [[1 + i] * (6 + 3 * i) for i in range(4)]
    expected = [solo(model, p, 24) for p in prompts]
    # 12 blocks of 4 positions: four requests of 30 to 33 positions cannot all keep theirs
    with start_server(tiny_model(), model_name=NAME, block_size=4, num_blocks=12) as server:
        slow_steps(server, 0.01)  # one request alone takes a quarter of a second: the four overlap
        results, errors = {}, []

        def client(i):
            try:
                results[i] = [e["choices"][0]["token_ids"][0] for e in stream(server, prompt=prompts[i],
                                                                              max_tokens=24)[:-1]]
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert not errors and [results.get(i) for i in range(4)] == expected
        stats = health(server)
        assert stats["preemptions"] > 0 and stats["blocks_in_use"] == 0


def test_a_request_the_engine_refuses_is_a_400(model):
    with start_server(tiny_model(), model_name=NAME, block_size=4, num_blocks=4) as server:
        status, _, body = request(server, "POST", "/v1/completions", {**GOOD, "prompt": [1] * 10, "max_tokens": 10})
        assert status == 400 and "num_blocks=4" in body["error"]["message"]
        assert complete(server, **GOOD)["choices"][0]["token_ids"] == solo(model, [1, 2, 3], 2)


def test_one_connection_serves_requests_one_after_the_other(server, model):
    ok = {"model": NAME, "prompt": [9, 9], "max_tokens": 3, "temperature": 0}
    expected = solo(model, [9, 9], 3)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        assert request(server, "POST", "/v1/completions", ok, connection=conn)[0] == 200
        assert request(server, "POST", "/v1/completions", {**ok, "n": 2}, connection=conn)[0] == 400
        assert request(server, "GET", "/nowhere", connection=conn)[0] == 404
        conn.request("POST", "/v1/completions", json.dumps({**ok, "stream": True}))
        events = events_of(conn.getresponse().read().decode())
        assert [e["choices"][0]["token_ids"][0] for e in events[:-1]] == expected
        status, _, body = request(server, "POST", "/v1/completions", ok, connection=conn)  # after a stream, too
        assert status == 200 and body["choices"][0]["token_ids"] == expected
    finally:
        conn.close()


def test_an_http_1_0_client_reads_a_stream_that_ends_with_the_connection(server, model):
    body = json.dumps({"model": NAME, "prompt": [4, 2], "max_tokens": 5, "temperature": 0, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and head.startswith(b"HTTP/1.1 200")
    events = events_of(payload.decode())
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["token_ids"][0] for e in events[:-1]] == solo(model, [4, 2], 5)


def test_models_and_health(server):
    status, _, body = request(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [(NAME, "model")]
    stats = health(server)
    assert stats["status"] == "ok" and stats["model"] == NAME
    assert stats["blocks_in_use"] == 0 and stats["active_requests"] == 0
    assert isinstance(stats["free_blocks"], int) and stats["free_blocks"] > 0


# ---- clients that go away -------------------------------------------------------------------------


@pytest.fixture
def slow_server():
    """A server of its own (its engine is slowed down) with counts that start at zero."""
    with start_server(tiny_model(), model_name=NAME, block_size=8) as server:
        slow_steps(server, 0.01)  # 100 tokens take a second: time to leave in the middle
        yield server


def test_a_stream_whose_client_leaves_is_cancelled_and_its_blocks_freed(slow_server, model):
    conn = http.client.HTTPConnection("127.0.0.1", slow_server.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": [1, 2, 3], "max_tokens": 100,
                                                        "temperature": 0, "stream": True}))
    response = conn.getresponse()
    first = [response.readline() for _ in range(4)]  # two events, each "data: ...\n" then "\n"
    assert first[0].startswith(b"data: ") and first[2].startswith(b"data: ")
    assert health(slow_server)["blocks_in_use"] > 0  # the request is still running
    response.close()
    conn.close()
    stats = wait_for(lambda: (s := health(slow_server))["blocks_in_use"] == 0 and s, "the blocks to be freed")
    assert stats["cancelled_requests"] == 1 and stats["active_requests"] == 0
    assert complete(slow_server, prompt=[5], max_tokens=4)["choices"][0]["token_ids"] == solo(model, [5], 4)


def test_a_waiting_client_that_gives_up_is_cancelled(slow_server):
    conn = http.client.HTTPConnection("127.0.0.1", slow_server.port, timeout=0.3)
    conn.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": [1, 2, 3], "max_tokens": 100,
                                                        "temperature": 0}))
    with pytest.raises(TimeoutError):
        conn.getresponse()  # 100 tokens take a second: the client's 0.3 s run out first
    conn.close()
    stats = wait_for(lambda: (s := health(slow_server))["cancelled_requests"] == 1 and s, "the request to be cancelled")
    assert stats["blocks_in_use"] == 0 and stats["active_requests"] == 0


def test_closing_the_server_ends_a_request_in_flight():
    server = start_server(tiny_model(), model_name=NAME)
    slow_steps(server, 0.01)
    answers = []

    def client():
        try:
            answers.append(request(server, "POST", "/v1/completions",
                                   {"model": NAME, "prompt": [1], "max_tokens": 100, "temperature": 0}))
        except (OSError, http.client.HTTPException) as err:
            answers.append(err)

    thread = threading.Thread(target=client)
    thread.start()
    wait_for(lambda: health(server)["active_requests"] == 1, "the request to start")
    server.close()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    (answer,) = answers
    if isinstance(answer, tuple):  # the handler answered before its connection was closed
        status, _, body = answer
        assert status == 503 and "closing" in body["error"]["message"]
    server.close()  # twice is harmless


# ---- errors ---------------------------------------------------------------------------------------

BAD = [  # (body, status, param, substrings of the message)
    (b"{bad", 400, None, ["not valid JSON"]),
    (b"\xff\xfe", 400, None, ["not UTF-8"]),
    (b"[1, 2]", 400, None, ["must be a JSON object", "list"]),
    (b'{"model": "tiny", "prompt": [1], "temperature": NaN}', 400, None, ["NaN"]),
    ({**GOOD, "foo": 1}, 400, "foo", ["unknown field 'foo'"]),
    ({k: v for k, v in GOOD.items() if k != "model"}, 400, "model", ["'model' is required"]),
    ({**GOOD, "model": 3}, 400, "model", ["'model' must be a string"]),
    ({**GOOD, "model": "gpt-4"}, 404, "model", ["The model 'gpt-4' does not exist", "'tiny'"]),
    ({k: v for k, v in GOOD.items() if k != "prompt"}, 400, "prompt", ["'prompt' is required"]),
    ({**GOOD, "prompt": "Hello"}, 400, "prompt", ["no tokenizer", "list of token ids"]),
    ({**GOOD, "prompt": []}, 400, "prompt", ["empty"]),
    ({**GOOD, "prompt": [1, 256]}, 400, "prompt", ["'prompt'[1]=256", "[0, 256)"]),
    ({**GOOD, "prompt": [-1]}, 400, "prompt", ["'prompt'[0]=-1"]),
    ({**GOOD, "prompt": [True]}, 400, "prompt", ["'prompt'[0]=true"]),
    ({**GOOD, "prompt": [1.0]}, 400, "prompt", ["'prompt'[0]=1.0"]),
    ({**GOOD, "prompt": [[1], [2]]}, 400, "prompt", ["2 prompts", "one prompt per request"]),
    ({**GOOD, "prompt": {"a": 1}}, 400, "prompt", ["string or a list of token ids"]),
    ({**GOOD, "max_tokens": "5"}, 400, "max_tokens", ["'max_tokens' must be an integer", '"5"']),
    ({**GOOD, "max_tokens": True}, 400, "max_tokens", ["'max_tokens' must be an integer", "true"]),
    ({**GOOD, "max_tokens": 2.0}, 400, "max_tokens", ["'max_tokens' must be an integer"]),
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens", ["'max_tokens' must be >= 1"]),
    ({**GOOD, "prompt": [1] * 100, "max_tokens": 29}, 400, "max_tokens",
     ["maximum context length is 128", "needs 129", "100 in the prompt", "max_tokens=29"]),
    ({**GOOD, "temperature": -0.5}, 400, "temperature", ["'temperature' must be a number in [0, 2]", "-0.5"]),
    ({**GOOD, "temperature": "hot"}, 400, "temperature", ["'temperature'", '"hot"']),
    ({**GOOD, "top_p": 0}, 400, "top_p", ["'top_p' must be a number in (0, 1]"]),
    ({**GOOD, "top_k": 0}, 400, "top_k", ["'top_k' must be >= 1"]),
    ({**GOOD, "seed": -1}, 400, "seed", ["'seed' must be >= 0"]),
    ({**GOOD, "seed": 1.5}, 400, "seed", ["'seed' must be an integer"]),
    ({**GOOD, "stream": "yes"}, 400, "stream", ["'stream' must be true or false"]),
    ({**GOOD, "stop": "\n"}, 400, "stop", ["'stop'", "not supported"]),
    ({**GOOD, "n": 2}, 400, "n", ["'n'=2 is not supported", "one completion per request"]),
    ({**GOOD, "echo": True}, 400, "echo", ["'echo'=true is not supported"]),
    ({**GOOD, "logprobs": 2}, 400, "logprobs", ["'logprobs'"]),
]


@pytest.mark.parametrize("body, status, param, substrings", BAD, ids=range(len(BAD)))
def test_a_bad_request_gets_an_error_that_names_the_problem(server, model, body, status, param, substrings):
    got, headers, answer = request(server, "POST", "/v1/completions", body)
    assert got == status and headers["Content-Type"] == "application/json"
    error = answer["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
    for text in substrings:
        assert text in error["message"], error["message"]
    assert complete(server, **GOOD)["choices"][0]["token_ids"] == solo(model, [1, 2, 3], 2)  # still serving


def test_neutral_values_of_unsupported_fields_are_accepted(server, model):
    body = complete(server, **GOOD, stop=None, n=1, echo=False, logprobs=None, presence_penalty=0.0, user="me",
                    stream=False, top_p=1, seed=None)
    assert body["choices"][0]["token_ids"] == solo(model, [1, 2, 3], 2)


@pytest.mark.parametrize("method, path, status, substring", [
    ("GET", "/v1/nowhere", 404, "no such path '/v1/nowhere'"),
    ("POST", "/v1/models", 405, "/v1/models takes GET, not POST"),
    ("GET", "/v1/completions", 405, "/v1/completions takes POST, not GET"),
    ("DELETE", "/health", 405, "/health takes GET, not DELETE"),
])
def test_wrong_paths_and_methods(server, method, path, status, substring):
    got, headers, answer = request(server, method, path, b"{}" if method == "POST" else None)
    assert got == status and substring in answer["error"]["message"]
    if status == 405:
        assert headers["Allow"] in ("GET", "POST")


def test_a_body_without_content_length_is_refused(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\n{}\r\n0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):  # the server closes: it cannot skip a chunked body
            data += chunk
    assert data.startswith(b"HTTP/1.1 411") and b"Content-Length" in data


def test_a_body_shorter_than_its_content_length_is_refused(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400") and b"ended after 2 of the 100 bytes" in data


def test_an_engine_failure_is_a_500_and_the_server_keeps_serving(model):
    with start_server(tiny_model(), model_name=NAME) as server:
        add, step = server.engine.add_request, server.engine.step

        def broken_add(*args, **kwargs):
            raise RuntimeError("out of paper")

        def broken_step():
            server.engine.step = step  # fails once, before touching the engine
            raise RuntimeError("jammed")

        server.engine.add_request = broken_add
        status, _, body = request(server, "POST", "/v1/completions", GOOD)
        assert status == 500 and "out of paper" in body["error"]["message"]
        assert body["error"]["type"] == "server_error"
        server.engine.add_request = add
        server.engine.step = broken_step
        status, _, body = request(server, "POST", "/v1/completions", GOOD)
        assert status == 500 and "jammed" in body["error"]["message"]
        assert health(server)["blocks_in_use"] == 0
        assert complete(server, **GOOD)["choices"][0]["token_ids"] == solo(model, [1, 2, 3], 2)


def test_parse_completion_request_alone():
    args = dict(model_name="m", vocab_size=10, max_seq_len=8)
    request = parse_completion_request({"model": "m", "prompt": "abc", "max_tokens": 5},
                                       encode=lambda s: [1] * len(s), **args)
    assert (request.prompt_ids, request.max_tokens, request.temperature, request.stream) == ([1, 1, 1], 5, 1.0, False)
    with pytest.raises(APIError, match="encodes to no tokens"):
        parse_completion_request({"model": "m", "prompt": ""}, encode=lambda s: [], **args)
    with pytest.raises(APIError, match="the request needs 19"):  # max_tokens defaults to 16
        parse_completion_request({"model": "m", "prompt": [1, 2, 3]}, **args)


# ---- text, end tokens and checkpoint directories ------------------------------------------------------

TEXT = "the cat sat on the mat. the dog sat on the log. " * 20


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    """A checkpoint directory laid out as ``save_pretrained`` writes it, with a tokenizer.json.

    The package has no ``save_pretrained`` of its own for float weights; this is its layout:
    ``config.json`` (``to_hf()`` plus ``model_type``) and ``model.safetensors`` under Hugging
    Face's names (:func:`companion.checkpoint.hf_state_dict`).
    """
    pytest.importorskip("tokenizers")
    from safetensors.torch import save_file

    from companion.checkpoint import hf_state_dict
    from companion.tokenizers import BPETokenizer, to_huggingface

    tok = BPETokenizer.train(TEXT, vocab_size=300)
    model = tiny_model(seed=1, vocab_size=tok.vocab_size)
    path = tmp_path_factory.mktemp("checkpoint")
    greedy = solo(model, tok.encode("the cat"), 20)
    # the end token: the first greedy token of "the cat" not seen before it, at least the 3rd
    at = next(i for i in range(2, 20) if greedy[i] not in greedy[:i])
    eos = greedy[at]
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **model.config.to_hf(),
              "eos_token_id": eos}
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in hf_state_dict(model).items()}, path / "model.safetensors")
    to_huggingface(tok).save(str(path / "tokenizer.json"))
    return path, model, tok, eos


def test_load_model_dir_reads_model_tokenizer_and_eos(directory):
    path, model, tok, eos = directory
    loaded = load_model_dir(path)
    assert loaded.model_type == "llama" and loaded.eos_token_id == eos
    assert loaded.model.config == model.config
    assert loaded.tokenizer.encode("the cat sat").ids == tok.encode("the cat sat")


def test_text_prompts_stop_at_eos_and_streamed_text_adds_up(directory):
    path, model, tok, eos = directory
    loaded = load_model_dir(path)
    ids = tok.encode("the cat")
    expected = solo(model, ids, 20, eos_token_id=eos)
    assert expected[-1] == eos and 3 <= len(expected) < 20
    with start_server(loaded.model, tokenizer=loaded.tokenizer, eos_token_id=loaded.eos_token_id,
                      model_name=NAME) as server:
        body = complete(server, prompt="the cat", max_tokens=20)
        (choice,) = body["choices"]
        assert choice["token_ids"] == expected and choice["finish_reason"] == "stop"
        assert choice["text"] == loaded.tokenizer.decode(expected)
        assert body["usage"]["prompt_tokens"] == len(ids)
        events = stream(server, prompt="the dog sat", max_tokens=30)[:-1]  # random bytes: cut characters
        tokens = [e["choices"][0]["token_ids"][0] for e in events]
        assert "".join(e["choices"][0]["text"] for e in events) == loaded.tokenizer.decode(tokens)
        assert complete(server, prompt="the dog sat", max_tokens=30)["choices"][0]["token_ids"] == tokens


def test_a_quantized_directory_from_save_quantized_is_served(tmp_path):
    from companion.quantize import quantize_, save_quantized

    save_quantized(quantize_(tiny_model(seed=2), "int8"), tmp_path / "q")
    loaded = load_model_dir(tmp_path / "q")
    assert loaded.tokenizer is None and loaded.eos_token_id is None
    expected = solo(loaded.model, [1, 2, 3], 6)
    server = server_from_args(["--model", str(tmp_path / "q"), "--port", "0", "--block-size", "4", "--quiet"])
    with server:
        assert server.model_name == "q" and server.url.startswith("http://127.0.0.1:")
        body = request(server, "POST", "/v1/completions", {"model": "q", "prompt": [1, 2, 3], "max_tokens": 6,
                                                           "temperature": 0})[2]
        assert body["choices"][0]["token_ids"] == expected


def test_an_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_model_dir(tmp_path)
    with pytest.raises(SystemExit, match="model_type='gpt2'"):
        server_from_args(["--model", str(tmp_path), "--port", "0"])
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", **CONFIG.to_hf()}))
    with pytest.raises(ValueError, match="dtype='float13'"):
        load_model_dir(llama, dtype="float13")


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "companion.serve", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--model DIR" in result.stdout and "--num-blocks" in result.stdout
