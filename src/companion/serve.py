"""An OpenAI-compatible completions endpoint over :class:`companion.generation.engine.Engine`.

``python -m companion.serve --model DIR`` loads a checkpoint directory and answers
``POST /v1/completions`` the way OpenAI's API does, so any client written for it (``curl``,
the ``openai`` package with ``base_url="http://127.0.0.1:8000/v1"``) can query a model of
this package. :func:`start_server` does the same from Python, in background threads, so a
notebook cell can start a server and the next cell can query it.

**One thread owns the engine.** The engine batches every unfinished request into each of its
steps (that is the point of continuous batching), and its state (the queues of waiting and
running requests, the table of free KV-cache blocks) is not protected by any lock. So exactly
one thread, the *engine loop*, ever calls it. The HTTP server answers each connection in a
thread of its own; a handler thread talks to the loop only through queues:

* the loop's *inbox* receives small functions to run on the loop's thread: add a request
  (the handler waits for the request id, or for the ``ValueError`` of ``add_request``),
  cancel one, read the statistics;
* each request has its own *stream*, a queue into which the loop puts every
  :class:`~companion.generation.engine.StepOutput` of that request, the last one with
  ``finished=True``.

The loop runs the functions in its inbox, then one engine step, and again. When no request
is unfinished, it blocks on its inbox instead of spinning, until a handler sends it work.

**Streaming.** With ``"stream": true`` each new token is sent as soon as the step that made
it returns, as a server-sent event ``data: {...}\\n\\n`` (the format OpenAI uses), and the
stream ends with ``data: [DONE]\\n\\n``. The server speaks HTTP/1.1 and sends the stream in
chunked transfer encoding, so the connection can serve the next request afterwards.

**Text.** Tokens are bytes for a byte-level tokenizer, and a character of UTF-8 text may
span several tokens, so decoding one token at a time would cut characters in two. The text
of each chunk is the text the tokens so far add to the text already sent, held back while it
ends in an incomplete character (U+FFFD, the replacement character); the chunks of a stream
therefore add up to the text of the whole completion. Every response also carries
``token_ids``, an extension of OpenAI's format, so a client without the tokenizer (and the
tests) can check the exact tokens.

**A client that goes away.** A request that nobody will read still holds its KV-cache blocks
and a place in every step until it finishes. When writing to a streaming client fails
(``BrokenPipeError``, ``ConnectionResetError``), or a client waiting for a whole completion
closes its connection, the handler asks the loop to ``cancel`` the request, which frees its
blocks at once.

**Errors.** A bad request gets a 4xx answer in OpenAI's shape, ``{"error": {"message": ...,
"type": "invalid_request_error", "param": <the field or null>, "code": null}}``, whose
message names the field and the rule it breaks (:func:`parse_completion_request`). Anything
else that goes wrong in a handler is a 500 with a message; no request can stop the server.

>>> request = parse_completion_request(
...     b'{"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}',
...     model_name="tiny", vocab_size=256, max_seq_len=128)
>>> request.prompt_ids, request.max_tokens, request.temperature, request.stream
([1, 2, 3], 4, 0.0, False)
>>> parse_completion_request(b'{"model": "tiny", "prompt": [1], "max_tokens": "5"}',
...                          model_name="tiny", vocab_size=256, max_seq_len=128)
Traceback (most recent call last):
    ...
companion.serve.APIError: 'max_tokens' must be an integer, got "5"
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import queue
import select
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple
from urllib.parse import urlsplit

__all__ = [
    "APIError",
    "CompletionRequest",
    "LoadedModel",
    "Server",
    "load_model_dir",
    "main",
    "parse_completion_request",
    "server_from_args",
    "start_server",
]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; 0 is greedy decoding
MAX_TEMPERATURE = 2.0  # OpenAI's upper bound
GREEDY_BELOW = 1e-5  # a smaller temperature is greedy: dividing logits by 1e-40 overflows to inf and NaN
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes
MAX_BODY_BYTES = 8 * 2**20  # a prompt of a million token ids, written as JSON, still fits
POLL_SECONDS = 0.1  # how often a waiting handler checks that its client and the loop are still there
IDLE_TIMEOUT_SECONDS = 60.0  # a connection that sends nothing for this long is closed

# config.json's model_type -> (module, class) of the family that loads it.
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("companion.llama", "Llama"),
    "mistral": ("companion.mistral", "Mistral"),
    "phi": ("companion.phi", "Phi"),
}

# Fields of OpenAI's request that this server accepts only with the value that turns them off.
NEUTRAL: dict[str, tuple[Any, str]] = {
    "stop": (None, "stop sequences are not implemented; the engine stops at the model's eos token"),
    "n": (1, "this server returns one completion per request"),
    "best_of": (1, "this server returns one completion per request"),
    "echo": (False, "the prompt is not repeated in the completion"),
    "logprobs": (None, "log-probabilities are not returned"),
    "suffix": (None, "insertion (a text after the completion) is not supported"),
    "presence_penalty": (0, "penalties are not implemented"),
    "frequency_penalty": (0, "penalties are not implemented"),
    "logit_bias": (None, "logit biases are not implemented"),
}
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stream", "seed", "user", *NEUTRAL}


# ---- requests ----------------------------------------------------------------------------------


class APIError(Exception):
    """A request the server refuses: an HTTP ``status``, a ``message`` and the ``param`` at fault.

    :meth:`body` is the JSON body of the answer, in OpenAI's shape.

    >>> APIError("'n' must be 1", param="n").body()["error"]["param"]
    'n'
    """

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.headers = message, status, param, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, status=self.status, param=self.param)


def error_body(message: str, *, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclass
class CompletionRequest:
    """A checked ``/v1/completions`` request, in the engine's terms."""

    prompt_ids: list[int]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stream: bool = False


def _show(value: Any) -> str:
    """``value`` as JSON writes it (``true``, ``"5"``, ``null``), for messages about JSON fields."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is not 1


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_neutral(value: Any, neutral: Any) -> bool:
    """Is ``value`` the setting ``neutral`` (``False``, or a number such as 1 or 0) that turns a field off?"""
    if isinstance(neutral, bool):
        return value is neutral
    return _is_number(value) and value == neutral


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_completion_request(
    body: bytes | str | dict[str, Any],
    *,
    model_name: str,
    vocab_size: int,
    max_seq_len: int,
    encode: Callable[[str], list[int]] | None = None,
) -> CompletionRequest:
    """Check the body of a ``/v1/completions`` request; raise :class:`APIError` at its first problem.

    The rules, each with the error it raises (status 400 unless said):

    * the body is a JSON object (not malformed JSON, not ``NaN``, not an array);
    * every field is known (the message names the first unknown one);
    * ``model`` is given and equals ``model_name`` (else 404, naming both);
    * ``prompt`` is given: a string (with ``encode``, the tokenizer's; without one, a string
      is refused) or a non-empty list of token ids, integers in ``[0, vocab_size)``; a list
      holding one string or one list of ids is that prompt, several prompts are refused;
    * ``max_tokens`` (default 16) is an integer >= 1, and the prompt's length plus
      ``max_tokens`` is at most ``max_seq_len``: every position the request needs must exist;
    * ``temperature`` (default 1, 0 is greedy) is a number in [0, 2], and below ``1e-5`` it
      is greedy (dividing the logits by a tinier one would overflow to ``inf``, and one such
      request would fail the whole batch's sampling); ``top_p`` a number in (0, 1]; ``top_k``
      (an extension) an integer >= 1; ``seed`` an integer in [0, 2**63);
      ``stream`` a boolean; ``user`` a string (ignored). ``null`` means the default;
    * ``stop``, ``n``, ``best_of``, ``echo``, ``logprobs``, ``suffix``, the penalties and
      ``logit_bias`` are accepted only with the value that turns them off (``null``, 1,
      ``false`` or 0).

    Integers are JSON integers: ``"5"``, ``5.0`` and ``true`` are not 5.

    >>> ok = dict(model_name="m", vocab_size=10, max_seq_len=32)
    >>> parse_completion_request({"model": "m", "prompt": [[1, 2]], "top_p": 0.9}, **ok)
    CompletionRequest(prompt_ids=[1, 2], max_tokens=16, temperature=1.0, top_p=0.9, top_k=None, seed=None, stream=False)
    >>> parse_completion_request({"model": "m", "prompt": [1, 2], "max_tokens": 31}, **ok)
    Traceback (most recent call last):
        ...
    companion.serve.APIError: This model's maximum context length is 32 tokens; the request needs 33 (2 in the prompt, max_tokens=31 for the completion)
    >>> parse_completion_request({"model": "m", "prompt": [1, 12]}, **ok)
    Traceback (most recent call last):
        ...
    companion.serve.APIError: 'prompt'[1]=12 is not a token id: ids are integers in [0, 10)
    """
    if isinstance(body, (bytes, bytearray)):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as err:
            raise APIError(f"the body is not UTF-8 text: {err}") from None
    if isinstance(body, str):
        try:
            body = json.loads(body, parse_constant=_reject_constant)
        except ValueError as err:
            raise APIError(f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise APIError(f"the body must be a JSON object, got {type(body).__name__} {_show(body)}")

    for name in body:
        if name not in FIELDS:
            raise APIError(f"unknown field {name!r}: this server accepts {', '.join(sorted(FIELDS))}", param=name)

    model = body.get("model")
    if model is None:
        raise APIError("'model' is required", param="model")
    if not isinstance(model, str):
        raise APIError(f"'model' must be a string, got {_show(model)}", param="model")
    if model != model_name:
        raise APIError(f"The model {model!r} does not exist: this server serves {model_name!r}",
                       status=404, param="model")

    for name, (neutral, why) in NEUTRAL.items():
        value = body.get(name)
        if value is not None and not _is_neutral(value, neutral):
            shown = "null (or leave it out)" if neutral is None else f"{_show(neutral)} (or null)"
            raise APIError(f"{name!r}={_show(value)} is not supported: {why}; give {shown}", param=name)

    prompt_ids = _prompt_ids(body.get("prompt"), vocab_size, encode)
    max_tokens = _optional_int(body, "max_tokens", DEFAULT_MAX_TOKENS, minimum=1)
    if len(prompt_ids) + max_tokens > max_seq_len:
        raise APIError(f"This model's maximum context length is {max_seq_len} tokens; the request needs "
                       f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt, max_tokens={max_tokens} "
                       "for the completion)", param="max_tokens")

    temperature = body.get("temperature")
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE
    if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise APIError(f"'temperature' must be a number in [0, {MAX_TEMPERATURE:g}] (0 is greedy decoding), "
                       f"got {_show(temperature)}", param="temperature")
    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise APIError(f"'top_p' must be a number in (0, 1], got {_show(top_p)}", param="top_p")
    top_k = _optional_int(body, "top_k", None, minimum=1)
    seed = _optional_int(body, "seed", None, minimum=0, maximum=MAX_SEED)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(f"'stream' must be true or false, got {_show(stream)}", param="stream")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(f"'user' must be a string, got {_show(user)}", param="user")
    temperature = 0.0 if temperature < GREEDY_BELOW else float(temperature)
    return CompletionRequest(prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=temperature,
                             top_p=None if top_p is None or top_p == 1 else float(top_p), top_k=top_k,
                             seed=seed, stream=bool(stream))


def _optional_int(body: dict[str, Any], name: str, default: int | None, *, minimum: int,
                  maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise APIError(f"{name!r} must be an integer, got {_show(value)}", param=name)
    if value < minimum:
        raise APIError(f"{name!r} must be >= {minimum}, got {value}", param=name)
    if maximum is not None and value > maximum:
        raise APIError(f"{name!r} must be <= {maximum}, got {value}", param=name)
    return value


def _prompt_ids(prompt: Any, vocab_size: int, encode: Callable[[str], list[int]] | None) -> list[int]:
    """The token ids of ``prompt``: a string, a list of ids, or a list holding one of those."""
    if prompt is None:
        raise APIError("'prompt' is required: a string, or a list of token ids", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise APIError(f"'prompt' holds {len(prompt)} prompts; this server takes one prompt per request",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if encode is None:
            raise APIError("'prompt' is text, but this server has no tokenizer (the model directory has no "
                           "tokenizer.json): give the prompt as a list of token ids", param="prompt")
        ids = list(encode(prompt))
        if not ids:
            raise APIError("'prompt' is empty: it encodes to no tokens", param="prompt")
        return ids
    if not isinstance(prompt, list):
        raise APIError(f"'prompt' must be a string or a list of token ids, got {_show(prompt)}", param="prompt")
    if not prompt:
        raise APIError("'prompt' is an empty list: give at least one token id", param="prompt")
    for i, token in enumerate(prompt):
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise APIError(f"'prompt'[{i}]={_show(token)} is not a token id: ids are integers in [0, {vocab_size})",
                           param="prompt")
    return list(prompt)


# ---- the engine loop ---------------------------------------------------------------------------


class ServerClosed(RuntimeError):
    """The engine loop has stopped: the server is closing, or the loop failed."""


class _Stop:
    """The message that ends the engine loop."""


class _EngineLoop:
    """The one thread that calls the engine; everyone else sends it messages (see the module's doc)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.cancelled = 0  # requests cancelled because their client went away or their handler failed
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[int, queue.Queue] = {}  # request id -> its outputs; only the loop touches this
        self._thread = threading.Thread(target=self._run, name="companion-engine-loop", daemon=True)
        self._thread.start()

    # -- on the loop's thread --

    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished()  # idle: sleep in the inbox, not in a spin
                while True:
                    try:
                        message = self._inbox.get(block=block)
                    except queue.Empty:
                        break
                    if message is _Stop:
                        return
                    try:
                        message()
                    except Exception:  # a cancel the engine refused: report it, keep serving
                        traceback.print_exc()
                    block = False
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as err:  # a broken engine: say so to every waiting handler
            traceback.print_exc()
            self._fail_all(ServerClosed(f"the engine loop failed: {type(err).__name__}: {err}"))
            raise
        finally:
            self._fail_all(ServerClosed("the server is closing"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:
            traceback.print_exc()
            self._fail_all(RuntimeError(f"the engine failed: {type(err).__name__}: {err}"))
            time.sleep(POLL_SECONDS)  # an engine that fails at every step must not spin a core printing tracebacks
            return
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
            if out.finished:
                self._streams.pop(out.request_id, None)
                finished = getattr(self.engine, "finished", None)  # the engine keeps them for run(); not needed here
                if isinstance(finished, dict):
                    finished.pop(out.request_id, None)

    def _fail_all(self, error: Exception) -> None:
        """End every unfinished request with ``error``, and free its blocks if the engine still can."""
        for rid, stream in list(self._streams.items()):
            stream.put(error)
            try:
                self.engine.cancel(rid)
            except Exception:
                pass
        self._streams.clear()

    # -- on any thread --

    def _put(self, message: Any) -> None:
        if not self._thread.is_alive():
            raise ServerClosed("the engine loop has stopped")
        self._inbox.put(message)

    def _wait(self, replies: queue.Queue) -> Any:
        """The next item of ``replies``; ``ServerClosed`` if the loop stops first."""
        while True:
            try:
                return replies.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self._thread.is_alive() and replies.empty():
                    raise ServerClosed("the engine loop has stopped") from None

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the loop's thread and return its result, or raise its exception."""
        replies: queue.Queue = queue.Queue()

        def message() -> None:
            try:
                replies.put((True, fn()))
            except Exception as err:
                replies.put((False, err))

        self._put(message)
        ok, value = self._wait(replies)
        if not ok:
            raise value
        return value

    def submit(self, prompt_ids: list[int], max_new_tokens: int, **sampling: Any) -> tuple[int, queue.Queue]:
        """Add a request; its id and the queue its outputs will arrive in.

        Raises the engine's ``ValueError`` for arguments it refuses.
        """
        stream: queue.Queue = queue.Queue()

        def add() -> int:
            rid = self.engine.add_request(prompt_ids, max_new_tokens, **sampling)
            self._streams[rid] = stream
            return rid

        return self.call(add), stream

    def cancel(self, rid: int) -> None:
        """Drop request ``rid`` if it is unfinished; does not wait. A finished one is left alone."""
        def cancel() -> None:
            if self._streams.pop(rid, None) is not None:
                self.cancelled += 1
                self.engine.cancel(rid)

        try:
            self._put(cancel)
        except ServerClosed:
            pass  # the loop has stopped: nothing is running any more

    def outputs(self, stream: queue.Queue, still_wanted: Callable[[], bool] = lambda: True) -> Iterator[Any]:
        """The ``StepOutput``s of one request, up to its finished one.

        Raises ``ServerClosed`` or the engine's error if the loop ends the request, and
        ``ConnectionAbortedError`` as soon as ``still_wanted()`` says no (asked every
        ``POLL_SECONDS``, whether tokens are arriving or not).
        """
        checked = time.monotonic()
        while True:
            try:
                item = stream.get(timeout=POLL_SECONDS)
            except queue.Empty:
                item = None
            if time.monotonic() - checked >= POLL_SECONDS:
                if not still_wanted():
                    raise ConnectionAbortedError("the client closed the connection")
                checked = time.monotonic()
            if item is None:
                if not self._thread.is_alive() and stream.empty():
                    raise ServerClosed("the engine loop has stopped")
                continue
            if isinstance(item, Exception):
                raise item
            yield item
            if item.finished:
                return

    def stats(self) -> dict[str, Any]:
        """Counts of the engine and of this loop, read on the loop's thread."""
        def read() -> dict[str, Any]:
            stats: dict[str, Any] = {}
            for name in ("free_blocks", "blocks_in_use", "num_blocks", "block_size", "max_batch",
                         "peak_blocks_in_use", "preemptions"):
                value = getattr(self.engine, name, None)
                if isinstance(value, int):
                    stats[name] = value
            for name in ("running", "waiting"):  # counts, if the engine shows its queues
                value = getattr(self.engine, f"num_{name}", getattr(self.engine, name, None))
                if isinstance(value, int) or hasattr(value, "__len__"):
                    stats[name] = value if isinstance(value, int) else len(value)
            stats["active_requests"] = len(self._streams)
            stats["cancelled_requests"] = self.cancelled
            return stats

        return self.call(read)

    def close(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._inbox.put(_Stop)
            self._thread.join(timeout)


# ---- detokenizing ------------------------------------------------------------------------------


class _Tokenizer:
    """One face for a Hugging Face ``tokenizers.Tokenizer`` and :class:`companion.tokenizers.BPETokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        encoded = self.tokenizer.encode(text)
        return list(getattr(encoded, "ids", encoded))  # Hugging Face returns an Encoding

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


class _TextStream:
    """Text of a growing list of tokens, piece by piece, never cutting a character in two.

    Each token's text is read from a short window of tokens (the last complete piece and the
    new ones), so a step costs the same at the thousandth token as at the first.
    """

    def __init__(self, tokenizer: _Tokenizer | None) -> None:
        self.tokenizer, self.ids = tokenizer, []
        self.start = self.read = 0  # ids[start:read] is the last piece sent; ids[read:] are not sent yet

    def add(self, token: int) -> str:
        """The new text that ``token`` completes ("" while a character is still incomplete)."""
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        sent = self.tokenizer.decode(self.ids[self.start:self.read])
        text = self.tokenizer.decode(self.ids[self.start:])
        if len(text) > len(sent) and not text.endswith("\ufffd"):
            self.start, self.read = self.read, len(self.ids)
            return text[len(sent):]
        return ""

    def flush(self) -> str:
        """Whatever text is held back, at the end of the completion."""
        if self.tokenizer is None or self.read == len(self.ids):
            return ""
        sent = self.tokenizer.decode(self.ids[self.start:self.read])
        text = self.tokenizer.decode(self.ids[self.start:])
        self.start = self.read = len(self.ids)
        return text[len(sent):]


# ---- HTTP --------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a connection left open never keeps the process alive
    app: "Server"


class _Handler(BaseHTTPRequestHandler):
    """One connection: routes, reads bodies, writes JSON and event streams."""

    protocol_version = "HTTP/1.1"  # keep-alive, and chunked streams
    server_version = "companion-serve"
    timeout = IDLE_TIMEOUT_SECONDS
    server: _HTTPServer
    ROUTES = {"/v1/completions": ("POST", "_completions"), "/v1/models": ("GET", "_models"),
              "/health": ("GET", "_health")}

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.app.log_requests:
            super().log_message(format, *args)

    def _dispatch(self) -> None:
        self._headers_sent = False
        try:
            body = self._read_body()
            path = urlsplit(self.path).path.rstrip("/") or "/"
            if path not in self.ROUTES:
                raise APIError(f"no such path {path!r}: this server answers POST /v1/completions, GET /v1/models "
                               "and GET /health", status=404)
            method, name = self.ROUTES[path]
            if self.command != method:
                raise APIError(f"{path} takes {method}, not {self.command}", status=405, headers={"Allow": method})
            getattr(self, name)(body)
        except APIError as err:
            self._send_json(err.status, err.body(), err.headers)
        except ServerClosed as err:
            self._fail(503, str(err))
        except Exception as err:
            traceback.print_exc()
            self._fail(500, f"the server failed on this request: {type(err).__name__}: {err}")

    def _fail(self, status: int, message: str) -> None:
        if self._headers_sent:  # too late for a status: end the response where it is
            self.close_connection = True
        else:
            try:
                self._send_json(status, error_body(message, status=status))
            except OSError:
                self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True  # the body cannot be skipped: drop the connection after answering
            raise APIError("a chunked request body is not supported: send a Content-Length", status=411)
        length = self.headers.get("Content-Length")
        if length is None:
            if self.command in ("POST", "PUT", "PATCH"):
                self.close_connection = True
                raise APIError("a request body needs a Content-Length header", status=411)
            return b""
        if not length.isdigit():
            self.close_connection = True
            raise APIError(f"Content-Length={length!r} is not a number of bytes")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise APIError(f"the body has {int(length)} bytes, more than the limit of {MAX_BODY_BYTES}", status=413)
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            raise APIError(f"the body did not arrive within {IDLE_TIMEOUT_SECONDS:g} s", status=408) from None
        if len(body) < int(length):
            self.close_connection = True
            raise APIError(f"the body ended after {len(body)} of the {length} bytes its Content-Length announced")
        return body

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._headers_sent = True
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found while parsing the request line and headers, as JSON like every other error."""
        self.close_connection = True
        self._headers_sent = False
        try:
            self._send_json(code, error_body(message or HTTPStatus(code).phrase, status=code))
        except OSError:
            pass

    def _client_gone(self) -> bool:
        """Has the client closed its side? (Readable, with nothing to read, means closed.)

        A client that only shuts down its sending side and still reads looks the same; HTTP
        clients do not do that while waiting for an answer.
        """
        try:
            if hasattr(select, "poll"):  # select.select cannot watch descriptors past 1023
                poller = select.poll()
                poller.register(self.connection, select.POLLIN)
                readable = bool(poller.poll(0))
            else:
                readable = bool(select.select([self.connection], [], [], 0)[0])
            return readable and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- routes --

    def _models(self, body: bytes) -> None:
        app = self.server.app
        self._send_json(200, {"object": "list", "data": [
            {"id": app.model_name, "object": "model", "created": app.created, "owned_by": "companion",
             "max_model_len": app.engine.max_seq_len}]})

    def _health(self, body: bytes) -> None:
        app = self.server.app
        self._send_json(200, {"status": "ok", "model": app.model_name, **app.loop.stats()})

    def _completions(self, body: bytes) -> None:
        app = self.server.app
        request = parse_completion_request(body, model_name=app.model_name, vocab_size=app.engine.vocab_size,
                                           max_seq_len=app.engine.max_seq_len,
                                           encode=app.tokenizer.encode if app.tokenizer else None)
        try:
            rid, stream = app.loop.submit(request.prompt_ids, request.max_tokens, temperature=request.temperature,
                                          top_k=request.top_k, top_p=request.top_p, seed=request.seed,
                                          eos_token_id=app.eos_token_id)
        except ValueError as err:  # what the engine itself refuses
            raise APIError(str(err)) from None
        head = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
                "model": app.model_name}
        try:
            outputs = app.loop.outputs(stream, still_wanted=lambda: not self._client_gone())
            if request.stream:
                self._stream(head, outputs, app.tokenizer)
            else:
                self._complete(head, outputs, app.tokenizer, len(request.prompt_ids))
        except (ConnectionError, TimeoutError) as err:  # the client went away: nobody to answer
            self.close_connection = True
            self.log_message("client gone during %s: %s", head["id"], err)
        finally:
            app.loop.cancel(rid)  # frees the blocks of a request left unfinished; a no-op after the last token

    def _complete(self, head: dict[str, Any], outputs: Iterator[Any], tokenizer: _Tokenizer | None,
                  prompt_tokens: int) -> None:
        tokens, reason = [], None
        for out in outputs:
            if out.token is not None:
                tokens.append(int(out.token))
            reason = out.finish_reason
        text = tokenizer.decode(tokens) if tokenizer else ""
        self._send_json(200, {**head, "choices": [
            {"index": 0, "text": text, "token_ids": tokens, "logprobs": None, "finish_reason": reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                      "total_tokens": prompt_tokens + len(tokens)}})

    def _stream(self, head: dict[str, Any], outputs: Iterator[Any], tokenizer: _Tokenizer | None) -> None:
        # HTTP/1.1 clients get chunks; an HTTP/1.0 client reads until the connection closes.
        self._chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        self._headers_sent = True
        text = _TextStream(tokenizer)
        try:
            for out in outputs:
                piece = text.add(int(out.token)) if out.token is not None else ""
                if out.finished:
                    piece += text.flush()
                choice = {"index": 0, "text": piece, "token_ids": [] if out.token is None else [int(out.token)],
                          "logprobs": None, "finish_reason": out.finish_reason if out.finished else None}
                self._send_chunk(b"data: " + json.dumps({**head, "choices": [choice]}).encode("utf-8") + b"\n\n")
        except (ServerClosed, RuntimeError) as err:  # headers are sent: report the error as an event
            status = 503 if isinstance(err, ServerClosed) else 500
            self._send_chunk(b"data: " + json.dumps(error_body(str(err), status=status)).encode("utf-8") + b"\n\n")
        self._send_chunk(b"data: [DONE]\n\n")
        if self._chunked:
            self._send_chunk(b"")  # the empty chunk ends the response

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data) if self._chunked else data)


# ---- the server --------------------------------------------------------------------------------


class Server:
    """An OpenAI-compatible server of one ``engine``, running in background threads.

    Built by :func:`start_server` (from a model) or directly from an engine. ``url`` is its
    address (``http://127.0.0.1:8000``); :meth:`close` stops it, and a ``with`` block closes
    it at the end. ``tokenizer`` (a Hugging Face ``tokenizers.Tokenizer``, a
    :class:`companion.tokenizers.BPETokenizer`, or anything with ``encode`` and ``decode``)
    lets clients send text and read text; without it prompts are token ids and ``text`` is
    empty. Requests stop at ``eos_token_id`` if given. ``log_requests`` prints one line per
    request to stderr.
    """

    def __init__(self, engine: Any, *, tokenizer: Any = None, model_name: str = "companion",
                 host: str = "127.0.0.1", port: int = 0, eos_token_id: int | None = None,
                 log_requests: bool = False) -> None:
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name={model_name!r} must be a non-empty string")
        if eos_token_id is not None and not (_is_int(eos_token_id) and 0 <= eos_token_id < engine.vocab_size):
            raise ValueError(f"eos_token_id={eos_token_id!r} is not a token id: ids are integers in "
                             f"[0, {engine.vocab_size})")
        self.engine, self.model_name, self.eos_token_id = engine, model_name, eos_token_id
        self.tokenizer = None if tokenizer is None else _Tokenizer(tokenizer)
        self.log_requests, self.created = log_requests, int(time.time())
        self.loop = _EngineLoop(engine)
        try:
            server_class = type("_HTTPServer6", (_HTTPServer,), {"address_family": socket.AF_INET6}) \
                if ":" in host else _HTTPServer
            self._httpd = server_class((host, port), _Handler)
        except BaseException:
            self.loop.close()
            raise
        self._httpd.app = self
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": POLL_SECONDS},
                                        name="companion-http", daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        """What ``GET /health`` reports: the engine's block counts and the loop's request counts."""
        return self.loop.stats()

    def serve_forever(self) -> None:
        """Block until :meth:`close` (from another thread) or Ctrl-C."""
        while not self._closed.wait(1.0):
            pass

    def close(self) -> None:
        """Stop answering, end unfinished requests, and release the port. Closing twice is harmless."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._httpd.shutdown()
        self.loop.close()
        self._httpd.server_close()
        self._thread.join(10.0)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Server({self.model_name!r} at {self.url})"


def start_server(model: Any, *, tokenizer: Any = None, model_name: str = "companion", host: str = "127.0.0.1",
                 port: int = 0, eos_token_id: int | None = None, log_requests: bool = False,
                 **engine_kwargs: Any) -> Server:
    """Serve ``model`` at ``http://host:port`` in background threads; returns the :class:`Server`.

    ``model`` follows the cache protocol (:class:`~companion.llama.Llama`,
    :class:`~companion.mistral.Mistral`, :class:`~companion.phi.Phi`); it is wrapped in an
    :class:`~companion.generation.engine.Engine` built with ``engine_kwargs`` (``block_size``,
    ``num_blocks``, ``max_batch``). An engine may be given instead of a model. ``port=0``
    picks a free port (read it from ``server.port``). The host defaults to the loopback
    address, so the server is reachable only from this machine.

    The engine puts its own paged caches into the model's attention layers at every step, so
    while the server runs, generate with that model only through the server.

    >>> import http.client, json, torch
    >>> from companion.llama import Llama, LlamaConfig
    >>> _ = torch.manual_seed(0)
    >>> with start_server(Llama(LlamaConfig.preset("tiny")).eval(), model_name="tiny") as server:
    ...     client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    ...     client.request("POST", "/v1/completions", json.dumps(
    ...         {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0}))
    ...     answer = json.load(client.getresponse())
    >>> choice = answer["choices"][0]
    >>> len(choice["token_ids"]), choice["finish_reason"], answer["usage"]["total_tokens"]
    (5, 'length', 8)
    """
    if hasattr(model, "add_request") and hasattr(model, "step"):
        if engine_kwargs:
            raise TypeError(f"engine options {sorted(engine_kwargs)} need a model, not an engine that is already built")
        engine = model
    else:
        from companion.generation.engine import Engine

        engine = Engine(model, **engine_kwargs)
    return Server(engine, tokenizer=tokenizer, model_name=model_name, host=host, port=port,
                  eos_token_id=eos_token_id, log_requests=log_requests)


# ---- loading a checkpoint directory ------------------------------------------------------------


class LoadedModel(NamedTuple):
    """What :func:`load_model_dir` finds in a checkpoint directory."""

    model: Any
    tokenizer: Any  # a tokenizers.Tokenizer, or None without tokenizer.json
    eos_token_id: int | None
    model_type: str


def load_model_dir(path: str | Path, *, dtype: Any = "float32", device: Any = "cpu") -> LoadedModel:
    """Load the model, tokenizer and end token of a Hugging Face-style checkpoint directory.

    The family comes from ``config.json``'s ``model_type`` (``llama``, ``mistral`` or
    ``phi``; any other is a ``ValueError`` naming it), and the weights are read by the
    family's ``from_pretrained`` in ``dtype`` on ``device``: a directory written by
    :func:`companion.checkpoint.save_pretrained` (or Hugging Face's ``save_pretrained``), or
    by :func:`companion.quantize.save_quantized`.
    ``tokenizer.json``, if present, is read with Hugging Face's ``tokenizers`` package
    (:func:`companion.tokenizers.to_huggingface` makes one from this package's BPE). The end
    token is ``config.json``'s ``eos_token_id``; where that is a list (several end tokens),
    the first one, since the engine stops at one.
    """
    import torch

    from companion.checkpoint import read_config

    path = Path(path)
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{path / 'config.json'} has model_type={model_type!r}; this server loads "
                         f"{', '.join(sorted(FAMILIES))}")
    if isinstance(dtype, str):
        found = getattr(torch, dtype, None) if dtype.isidentifier() else None
        if not isinstance(found, torch.dtype) or not found.is_floating_point:
            raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype (float32, bfloat16, float16)")
        dtype = found
    module, name = FAMILIES[model_type]
    model = getattr(importlib.import_module(module), name).from_pretrained(path, dtype=dtype, device=device).eval()

    tokenizer = None
    if (path / "tokenizer.json").exists():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(f"{path} has a tokenizer.json; reading it needs Hugging Face's tokenizers package "
                              "(pip install tokenizers), or remove the file to serve token ids only") from None
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))

    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    vocab_size = model.config.vocab_size
    if eos is not None and not (_is_int(eos) and 0 <= eos < vocab_size):
        raise ValueError(f"{path / 'config.json'} has eos_token_id={eos!r}, not a token id in [0, {vocab_size})")
    return LoadedModel(model, tokenizer, eos, model_type)


# ---- the command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m companion.serve",
                                     description="Serve a checkpoint directory with an OpenAI-compatible "
                                                 "POST /v1/completions endpoint.")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="checkpoint directory: config.json, *.safetensors, optionally tokenizer.json")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: 16)")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: the engine's)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="most requests in one step (default: the engine's)")
    parser.add_argument("--model-name", default=None,
                        help="the name clients give as 'model' (default: the directory's name)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="do not log one line per request")
    return parser


def server_from_args(argv: list[str] | None = None) -> Server:
    """Parse the command line, load the directory and start a :class:`Server` (what ``main`` serves).

    A directory that cannot be loaded exits with the reason (``SystemExit``), not a traceback.
    """
    args = _parser().parse_args(argv)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        loaded = load_model_dir(args.model, dtype=args.dtype, device=device)
    except (ValueError, OSError, ImportError) as err:
        raise SystemExit(f"python -m companion.serve: cannot serve {args.model}: {err}") from None
    name = args.model_name or Path(args.model).resolve().name
    engine_kwargs = {k: v for k, v in (("block_size", args.block_size), ("num_blocks", args.num_blocks),
                                        ("max_batch", args.max_batch)) if v is not None}
    try:
        return start_server(loaded.model, tokenizer=loaded.tokenizer, model_name=name, host=args.host,
                            port=args.port, eos_token_id=loaded.eos_token_id, log_requests=not args.quiet,
                            **engine_kwargs)
    except (ValueError, OSError) as err:
        raise SystemExit(f"python -m companion.serve: cannot start the server: {err}") from None


def main(argv: list[str] | None = None) -> None:
    """``python -m companion.serve --model DIR ...``: load, print the URL, serve until Ctrl-C."""
    server = server_from_args(argv)
    tokens = "text or token ids" if server.tokenizer else "token ids (no tokenizer.json)"
    print(f"serving {server.model_name!r} at {server.url}/v1/completions; prompts are {tokens}; Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
