"""`zipjax serve`'s HTTP layer: request parsing and refusals, text and logprob formatting (units), then the openai
client against a real engine on checkpoints/stdlib-llama behind uvicorn on a loopback port (one server per module)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from zipjax.serve.openai_schema import ApiError, ChatRequest, CompletionRequest, from_validation, refuse_unsupported
from zipjax.serve.output import ChoiceOutput, chat_logprobs, completion_logprobs, token_text
from zipjax.serve.requests import TokenLogprob, Update
from zipjax.tokenizer import Tokenizer

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "stdlib-llama"
EOS = 2


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(CHECKPOINT)


# ------------------------------------------------------------------------------------------------ units


def _parse(model, body: dict) -> ApiError | object:
    try:
        parsed = model.model_validate(body)
    except ValidationError as e:
        return from_validation(e.errors())
    try:
        refuse_unsupported(parsed)
    except ApiError as e:
        return e
    return parsed


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens", "valid integer"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature", "finite"),
    ({"prompt": "x", "temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"prompt": [1, "a"]}, "prompt", "list of token ids"),
    ({"prompt": "x", "stop": 3}, "stop", "list of strings"),
    ({"prompt": "x", "temprature": 0}, "temprature", "Unrecognized request argument"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias", "not supported"),
    ({"prompt": "x", "best_of": 3}, "best_of", "not supported"),
    ({"prompt": "x", "suffix": "end"}, "suffix", "not supported"),
    ({"prompt": "x", "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats",
     "not supported"),
])
def test_a_bad_completion_body_is_a_400_naming_the_field(body, param, words):
    error = _parse(CompletionRequest, body)
    assert isinstance(error, ApiError) and error.status == 400, error
    assert error.param == param and words in error.message, error.body()
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_neutral_values_of_unimplemented_knobs_are_accepted():
    neutral = {"prompt": "x", "frequency_penalty": 0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
               "logit_bias": {}, "best_of": 1, "suffix": None, "user": "me", "min_tokens": 0, "top_k": -1,
               "stream_options": {"include_usage": True}, "response_format": {"type": "text"}}
    assert isinstance(_parse(CompletionRequest, neutral), CompletionRequest)
    chat = {"messages": [{"role": "user", "content": "hi", "name": None}], "tools": [], "tool_choice": "none",
            "parallel_tool_calls": True, "echo": False}
    assert isinstance(_parse(ChatRequest, chat), ChatRequest)
    for bad, param in ((dict(tools=[{"type": "function"}]), "tools"), (dict(echo=True), "echo"),
                       (dict(messages=[{"role": "user", "content": "hi", "name": "bob"}]), "messages.0.name"),
                       (dict(messages=[{"role": "user", "content": 7}]), "messages.0.content")):
        error = _parse(ChatRequest, {**chat, **bad})
        assert isinstance(error, ApiError) and error.status == 400 and error.param == param, (bad, error)


def test_stop_strings_cut_the_text_and_streaming_never_shows_their_start(tokenizer):
    ids = tokenizer.encode("def main():\n    return 42\n", add_special_tokens=False)
    full = tokenizer.decode(ids)
    for stop, include in (("return", False), ("return", True), ("):\n", False), ("absent", False)):
        cut = full.find(stop)
        expected = full if cut < 0 else full[:cut + len(stop) if include else cut]
        for streaming in (False, True):
            out = ChoiceOutput(tokenizer, [stop, "zzzz"], include_stop=include, streaming=streaming)
            pieces = []
            for token in ids:
                out.add(Update((token,)))
                if streaming:
                    pieces.append(out.take_text())
                    assert expected.startswith("".join(pieces)), (stop, pieces)
                if out.finished:
                    break
            if not out.finished:
                out.add(Update((), finish_reason="length"))
            pieces.append(out.take_text())
            assert out.text == expected and (not streaming or "".join(pieces) == expected), (stop, include)
            assert out.finish_reason == ("length" if cut < 0 else "stop")


def test_the_stop_token_is_counted_but_not_shown(tokenizer):
    ids = tokenizer.encode("import os", add_special_tokens=False)
    out = ChoiceOutput(tokenizer)
    out.add(Update(tuple(ids[:-1])))
    out.add(Update((ids[-1], EOS), finish_reason="stop"))
    assert out.text == "import os" and out.token_ids == [*ids, EOS] and out.finish_reason == "stop"
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]  # a stop_token_ids token that is plain text
    out = ChoiceOutput(tokenizer)
    out.add(Update((*ids, newline), finish_reason="stop"))
    assert out.text == "import os" and len(out.token_ids) == len(ids) + 1


def test_legacy_logprobs_match_openais_format(tokenizer):
    ids = tokenizer.encode("x = 1", add_special_tokens=True)
    entries = [None] + [TokenLogprob(t, -0.5 * i, ((t, -0.5 * i), (EOS, -7.0))) for i, t in enumerate(ids[1:])]
    entries[-1] = TokenLogprob(ids[-1], -math.inf, ((EOS, -1.0),))
    name = token_text(tokenizer, False)
    out = completion_logprobs(entries, ids, 1, name)
    assert out["token_logprobs"][0] is None and out["top_logprobs"][0] is None
    assert out["tokens"] == [name(t) for t in ids] and out["tokens"][0] == "<s>"
    assert out["text_offset"] == [sum(len(name(t)) for t in ids[:i]) for i in range(len(ids))]
    assert out["token_logprobs"][-1] == -9999.0  # JSON has no -inf
    assert out["top_logprobs"][1] == {name(ids[1]): 0.0}  # the chosen token is also the most likely
    assert out["top_logprobs"][-1] == {name(ids[-1]): -9999.0, "</s>": -1.0}
    as_ids = completion_logprobs(entries, ids, 0, token_text(tokenizer, True), offset=5)
    assert as_ids["tokens"][1] == f"token_id:{ids[1]}" and as_ids["text_offset"][0] == 5
    assert all(len(top) == 1 for top in as_ids["top_logprobs"][1:])
    chat = chat_logprobs(entries[1:], 2, name)["content"]
    assert chat[0]["token"] == name(ids[1]) and chat[0]["bytes"] == list(name(ids[1]).encode())
    assert [t["token"] for t in chat[0]["top_logprobs"]] == [name(ids[1]), "</s>"]
