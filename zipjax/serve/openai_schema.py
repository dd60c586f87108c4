"""The JSON bodies the OpenAI-compatible server accepts, as pydantic models, and the error type every refusal raises.

Types are strict (a string where a number belongs, a bool where an integer belongs, NaN: refused, never coerced),
and a field nobody defined is refused by name, as OpenAI's own API does ("Unrecognized request argument supplied").
Knobs that OpenAI or vLLM define but zipjax does not implement (penalties, logit_bias, best_of, tools, ...) are
accepted at their neutral value only (`NEUTRAL`), so a client that sends them as defaults keeps working, and a
client that relies on them learns at once (400 naming the knob) instead of getting silently different output.

`ApiError` carries an HTTP status and OpenAI's error body ({"error": {"message", "type", "param", "code"}});
`from_validation` turns pydantic's (and FastAPI's) validation errors into one.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from zipjax.serve.requests import MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str | None = None,
                 code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or _ERROR_TYPES.get(status, "invalid_request_error")
        self.code = code if code is not None else status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}

# fields whose union types make pydantic's own message a list of every branch: one sentence instead
_UNION_MESSAGES = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "stop must be a string or a list of strings",
    "content": "a message's content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts",
}


def from_validation(errors: list[dict]) -> ApiError:
    """The first of pydantic's validation errors as a 400 naming the field (FastAPI's locations start at "body")."""
    if not errors:
        return ApiError(400, "the request body is invalid")
    error = errors[0]
    loc = [part for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {error.get('ctx', {}).get('error', '')}".rstrip(
            ": "))
    if error.get("type") == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {_dotted(loc)}", param=_dotted(loc))
    if not loc:
        return ApiError(400, f"the request body must be a JSON object: {error.get('msg', '')}")
    for i in range(len(loc) - 1, -1, -1):
        if loc[i] in _UNION_MESSAGES:
            return ApiError(400, _UNION_MESSAGES[loc[i]], param=_dotted(loc[:i + 1]))
    where = _dotted(loc)
    return ApiError(400, f"{where}: {error.get('msg', 'invalid value')}", param=where)


def _dotted(loc) -> str:
    return ".".join(str(part) for part in loc) if loc else ""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's; neutral only


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: Any = None  # neutral: None
    tool_calls: Any = None  # neutral: None or []
    tool_call_id: Any = None  # neutral: None


class _Sampling(_Strict):
    """What /v1/completions and /v1/chat/completions share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None  # vLLM's extension: -1 or 0 (off), or >= 1
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    # accepted at their neutral values only (NEUTRAL)
    frequency_penalty: Any = None
    presence_penalty: Any = None
    repetition_penalty: Any = None
    logit_bias: Any = None
    user: str | None = None
    min_tokens: Any = None
    min_p: Any = None
    length_penalty: Any = None
    use_beam_search: Any = None
    skip_special_tokens: Any = None
    spaces_between_special_tokens: Any = None
    truncate_prompt_tokens: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    priority: Any = None
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    request_id: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False
    best_of: Any = None
    suffix: Any = None
    prompt_logprobs: Any = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    return_tokens_as_token_ids: bool = False
    add_generation_prompt: Any = None
    continue_final_message: Any = None
    echo: Any = None
    chat_template: Any = None
    chat_template_kwargs: Any = None
    documents: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a text (`prompt`) or a conversation (`messages`, through the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: Any = None
    return_token_strs: bool | None = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def _absent(value) -> bool:
    return value is None or value == [] or value == {} or value == ""


# knob -> a test of its neutral value (accepted: it means "off"); applies to the fields typed Any, which are exactly
# the knobs zipjax does not implement
NEUTRAL: dict[str, Any] = {
    "frequency_penalty": lambda v: v is None or v == 0,
    "presence_penalty": lambda v: v is None or v == 0,
    "repetition_penalty": lambda v: v is None or v == 1,
    "length_penalty": lambda v: v is None or v == 1,
    "min_tokens": lambda v: v is None or v == 0,
    "min_p": lambda v: v is None or v == 0,
    "logit_bias": _absent,
    "suffix": _absent,
    "use_beam_search": lambda v: v is None or v is False,
    "skip_special_tokens": lambda v: v is None or v is True,
    "spaces_between_special_tokens": lambda v: v is None or v is True,
    "truncate_prompt_tokens": lambda v: v is None,
    "allowed_token_ids": lambda v: v is None,
    "bad_words": _absent,
    "priority": lambda v: v is None or v == 0,
    "response_format": lambda v: v is None or v == {"type": "text"},
    "guided_json": _absent, "guided_regex": _absent, "guided_choice": _absent, "guided_grammar": _absent,
    "structured_outputs": _absent,
    "prompt_logprobs": lambda v: v is None,
    "add_generation_prompt": lambda v: v is None or v is True,
    "continue_final_message": lambda v: v is None or v is False,
    "echo": lambda v: v is None or v is False,
    "chat_template": lambda v: v is None,
    "chat_template_kwargs": _absent,
    "documents": _absent,
    "tools": _absent,
    "tool_choice": lambda v: v is None or v in ("none", "auto"),
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),  # without tools it changes nothing
    "functions": _absent,
    "function_call": lambda v: v is None or v == "none",
    "modalities": lambda v: v is None or v == ["text"],
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "metadata": lambda v: v is None or isinstance(v, dict),  # the caller's own labels: stored nowhere
    "store": lambda v: v is None or v is False,
    "service_tier": lambda v: v is None or v in ("auto", "default"),
    "name": lambda v: v is None,
    "tool_calls": _absent,
    "tool_call_id": lambda v: v is None,
}


def refuse_unsupported(body: BaseModel, where: str = "") -> None:
    """A 400 naming the first knob given at a value zipjax does not implement (stream_options' and the messages'
    own knobs included)."""
    fields = type(body).model_fields
    for name in sorted(body.model_fields_set):
        test = NEUTRAL.get(name)
        if test is not None and fields[name].annotation is Any and not test(getattr(body, name)):
            raise ApiError(400, f"{where}{name} is not supported by zipjax serve; only its neutral value is accepted "
                                f"(got {getattr(body, name)!r:.60})", param=f"{where}{name}")
    if isinstance(body, CompletionRequest) and body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, f"best_of is not supported by zipjax serve; give none or best_of equal to n "
                            f"(got {body.best_of!r:.60})", param="best_of")
    options = getattr(body, "stream_options", None)
    if options is not None and options.continuous_usage_stats:
        raise ApiError(400, "stream_options.continuous_usage_stats is not supported by zipjax serve",
                       param="stream_options.continuous_usage_stats")
    for i, message in enumerate(getattr(body, "messages", None) or ()):
        refuse_unsupported(message, f"messages.{i}.")
