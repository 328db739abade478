"""OpenAI's and Ollama's request shapes translated into the store's own: the rules, without services."""

from __future__ import annotations

import math

import pytest
from flask import Flask

from model_store_server import ollama_format, openai_format
from model_swap.errors import ApiError, register_error_handlers
from model_swap.web import parse_generation


def _code(fn, *args) -> tuple[int, str, str | None]:
    with pytest.raises(ApiError) as err:
        fn(*args)
    return err.value.status, err.value.code, err.value.param


def test_error_envelope_has_what_openai_clients_read():
    app = Flask(__name__)
    register_error_handlers(app)

    @app.get("/missing")
    def missing():
        raise ApiError(404, "model_not_found", "no such model", param="model", details={"closest": "a"})

    @app.get("/boom")
    def boom():
        raise RuntimeError("x")

    client = app.test_client()
    assert client.get("/missing").json == {"error": {"code": "model_not_found", "message": "no such model",
                                                     "type": "invalid_request_error", "param": "model",
                                                     "closest": "a"}}
    assert client.get("/boom").json["error"]["type"] == "server_error"
    assert client.get("/nowhere").json["error"]["code"] == "not_found"


def test_content_parts_are_joined():
    body = openai_format.internal_body({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}]},
        chat=True)
    assert parse_generation(body, chat=True).messages[1] == {"role": "user", "content": "Hello, world"}


@pytest.mark.parametrize(("content", "code"), [
    ([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], "unsupported_content"),
    ([{"type": "text", "text": "a"}, {"type": "input_audio", "input_audio": {}}], "unsupported_content"),
    ([{"type": "text"}], "invalid_request"),
    ([{"text": "no type"}], "invalid_request"),
    (42, "invalid_request"),
])
def test_content_parts_that_are_not_text_are_refused(content, code):
    assert _code(openai_format.internal_body, {"messages": [{"role": "user", "content": content}]}, True) == \
        (400, code, "messages[0]")


@pytest.mark.parametrize(("body", "chat", "logprobs"), [
    ({}, False, None), ({"logprobs": 0}, False, 0), ({"logprobs": 5}, False, 5),
    ({}, True, None), ({"logprobs": False}, True, None), ({"logprobs": True}, True, 0),
    ({"logprobs": True, "top_logprobs": 3}, True, 3),
])
def test_logprobs_become_a_count(body, chat, logprobs):
    assert openai_format.internal_body(dict(body, prompt="x"), chat)["logprobs"] == logprobs


@pytest.mark.parametrize(("body", "chat"), [
    ({"logprobs": 6}, False), ({"logprobs": True}, False), ({"logprobs": "yes"}, True),
    ({"top_logprobs": 2}, True),
])
def test_bad_logprobs_are_refused(body, chat):
    assert _code(openai_format.internal_body, body, chat)[:2] == (400, "invalid_request")


@pytest.mark.parametrize(("given", "internal"), [
    (None, None), ({"type": "text"}, None), ({"type": "json_object"}, {"type": "json_object"}),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
     {"type": "json_schema", "schema": {"type": "object"}}),
])
def test_response_format(given, internal):
    body = openai_format.internal_body({"prompt": "x", "response_format": given}, chat=False)
    assert parse_generation(body, chat=False).response_format == internal


@pytest.mark.parametrize("given", [{"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "yaml"}, "json"])
def test_bad_response_format_is_refused(given):
    body = openai_format.internal_body({"prompt": "x", "response_format": given}, chat=False)
    assert _code(parse_generation, body, False) == (400, "invalid_request", "response_format")


def test_stream_options():
    assert openai_format.include_usage({"stream": True, "stream_options": {"include_usage": True}}) is True
    assert openai_format.include_usage({"stream": True}) is False
    assert _code(openai_format.include_usage, {"stream_options": {"include_usage": True}})[1] == "invalid_request"
    assert _code(openai_format.include_usage, {"stream": True, "stream_options": {"x": 1}})[1] == "invalid_request"


def test_logprobs_shapes():
    pieces = [{"token": "He", "logprob": -0.5, "top_logprobs": [{"token": "He", "logprob": -0.5}]},
              {"token": "llo", "logprob": -1.0, "top_logprobs": [{"token": "y", "logprob": -0.9},
                                                                  {"token": "llo", "logprob": -1.0}]}]
    assert openai_format.completion_logprobs(pieces, offset=3) == {
        "tokens": ["He", "llo"], "token_logprobs": [-0.5, -1.0], "text_offset": [3, 5],
        "top_logprobs": [{"He": -0.5}, {"y": -0.9, "llo": -1.0}]}
    chat = openai_format.chat_logprobs(pieces)
    assert chat["content"][1]["top_logprobs"][0] == {"token": "y", "logprob": -0.9, "bytes": [121]}
    assert openai_format.chat_logprobs(None) is None


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (30, 30.0), ("30", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("300ms", 0.3),
    (-1, math.inf), ("-1", math.inf), ("-5m", math.inf), (0, 0.0), ("0", 0.0),
])
def test_keep_alive_durations(value, seconds):
    result = ollama_format.keep_alive_seconds(value)
    assert result is None if seconds is None else result == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5 minutes", "m5", "5x", True, [1]])
def test_bad_keep_alive_is_refused(value):
    assert _code(ollama_format.keep_alive_seconds, value) == (400, "invalid_request", "keep_alive")


def test_generate_is_a_one_turn_chat_unless_raw():
    body = ollama_format.generate_body({"prompt": "Hi", "system": "Be brief.", "options": {"num_predict": 3}})
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert body["max_tokens"] == 3
    raw = ollama_format.generate_body({"prompt": "Hi", "raw": True, "format": "json"})
    assert raw["prompt"] == "Hi" and raw["response_format"] == {"type": "json_object"}
    schema = ollama_format.chat_body({"messages": [{"role": "user", "content": "x"}], "format": {"type": "object"}})
    assert schema["response_format"] == {"type": "json_schema", "schema": {"type": "object"}}
    assert ollama_format.generate_body({"prompt": "x", "options": {"num_predict": -1}})["max_tokens"] == \
        ollama_format.UNLIMITED_TOKENS


def test_ollama_sampling_options_become_the_request_fields():
    options = {"top_p": 0.5, "seed": 7, "stop": ["\n\n"], "presence_penalty": 1.5, "frequency_penalty": -1,
               "temperature": 0.2}
    body = ollama_format.generate_body({"prompt": "x", "raw": True, "options": options})
    request = parse_generation(body, chat=False)
    assert (request.top_p, request.seed, request.stop, request.presence_penalty, request.frequency_penalty,
            request.temperature) == (0.5, 7, ("\n\n",), 1.5, -1, 0.2)
    assert _code(parse_generation, ollama_format.generate_body({"prompt": "x", "raw": True,
                                                                 "options": {"top_p": 2}}))[:2] == \
        (400, "invalid_request")


def test_openai_stop_is_applied_and_unknown_fields_refused():
    openai_format.refuse_unsupported({"model": "a", "prompt": "x", "stop": ["."], "seed": 1, "logprobs": 2})
    assert _code(openai_format.refuse_unsupported, {"model": "a", "logit_bias": {"1": 2}}) == \
        (400, "unsupported_parameter", "logit_bias")
    assert _code(openai_format.refuse_unsupported, {"model": "a", "n": 2}) == (400, "unsupported_parameter", "n")


@pytest.mark.parametrize(("body", "code", "param"), [
    ({"prompt": "x", "options": {"top_k": 20}}, "unsupported_parameter", "options.top_k"),
    ({"prompt": "x", "options": {"num_ctx": 4096}}, "unsupported_parameter", "options.num_ctx"),
    ({"prompt": "x", "options": {"bogus": 1}}, "unsupported_parameter", "options.bogus"),
    ({"prompt": "x", "images": ["aGk="]}, "unsupported_content", "images"),
    ({"prompt": "x", "suffix": "y"}, "unsupported_parameter", "suffix"),
    ({"prompt": "x", "context": [1, 2]}, "unsupported_parameter", "context"),
    ({"prompt": "x", "format": "yaml"}, "invalid_request", "format"),
    ({"prompt": 5}, "invalid_request", "prompt"),
])
def test_generate_refuses_what_it_cannot_honour(body, code, param):
    assert _code(ollama_format.generate_body, body) == (400, code, param)


def test_chat_refuses_images_and_tools():
    with_image = {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}
    assert _code(ollama_format.chat_body, with_image) == (400, "unsupported_content", "messages[0]")
    assert _code(ollama_format.chat_body, {"messages": [], "tools": [{"type": "function"}]})[1] == \
        "unsupported_parameter"
