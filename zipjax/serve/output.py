"""One choice's output as its tokens arrive: incremental text, stop strings, and OpenAI's logprob formats.

The engine streams token ids; `ChoiceOutput` turns them into text with zipjax.streamer's incremental detokenizer
(whole characters only) and applies what the engine leaves to the HTTP layer:
- a stop or end token (the last token of an update whose finish_reason is "stop") is counted in `usage` but never
  shown as text, as vLLM does;
- stop *strings*: the text is searched after every token; at the first match the choice ends with finish_reason
  "stop" and the text is cut before the stop string (or after it, with include_stop_str_in_output). While a choice
  streams, the last `longest stop - 1` characters are held back, so no client ever sees the start of a stop string
  that a later token completes.

Log-probabilities are formatted both ways clients read them: the legacy completions object (`tokens`,
`token_logprobs`, `top_logprobs` as a list of {token: logprob} dicts, `text_offset`) that lm-eval's
`local-completions` parses, and the chat object ({"content": [{"token", "logprob", "bytes", "top_logprobs"}]}).
A log-probability of -inf (a token the model rules out) is written as -9999.0, as vLLM does: JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from zipjax.serve.requests import TokenLogprob, Update
from zipjax.streamer import TextStreamer

LOGPROB_FLOOR = -9999.0


def finite(logprob: float) -> float:
    return LOGPROB_FLOOR if math.isnan(logprob) else max(logprob, LOGPROB_FLOOR)


class ChoiceOutput:
    """Feed a request's updates with `add`; read `text`, `token_ids`, `logprobs`, `finish_reason`, and (streaming)
    `take_text()` for the text that is safe to send now."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), *, include_stop: bool = False, streaming: bool = False):
        self._streamer = TextStreamer(tokenizer)
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop
        self._hold = self._longest - 1 if streaming and self._stop else 0
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self._sent = 0  # characters of `text` handed out by take_text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, update: Update) -> None:
        """Consume an update. Tokens after a stop string are dropped (the caller then cancels the request)."""
        if self.finished:
            return
        tokens = update.token_ids
        for i, token in enumerate(tokens):
            self.token_ids.append(token)
            if update.logprobs is not None:
                self.logprobs.append(update.logprobs[i])
            if update.finish_reason == "stop" and i == len(tokens) - 1:
                break  # the stop token: counted, never shown
            if self._append(self._streamer.push(token)):
                return
        if update.finish_reason is not None and not self._append(self._streamer.flush()):
            self.finish_reason = update.finish_reason

    def _append(self, piece: str) -> bool:
        """Add text; True when it completed a stop string (the choice is then finished)."""
        if not piece:
            return False
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        hits = [(at, s) for s in self._stop if (at := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        self.text = self.text[:at + len(stop) if self._include_stop else at]
        self.finish_reason = "stop"
        return True

    def take_text(self) -> str:
        """The text not yet handed out that no later token can turn into a stop string."""
        end = len(self.text) if self.finished else max(self._sent, len(self.text) - self._hold)
        piece, self._sent = self.text[self._sent:end], end
        return piece


def token_text(tokenizer, as_ids: bool) -> Callable[[int], str]:
    """How a token is named in logprobs: its text alone (special tokens shown, as vLLM shows them), or
    "token_id:N" (vLLM's return_tokens_as_token_ids)."""
    if as_ids:
        return lambda token: f"token_id:{token}"
    return lambda token: tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(entries: Sequence[TokenLogprob | None], token_ids: Sequence[int], top: int,
                        name: Callable[[int], str], offset: int = 0) -> dict:
    """OpenAI's legacy completions logprobs for these tokens: `top_logprobs[i]` maps the chosen token and the `top`
    most likely tokens to their log-probabilities (None where there is no entry: a prompt's first token);
    `text_offset[i]` is where token i's text starts, counting from `offset`."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(token_ids, entries, strict=True):
        text = name(token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(finite(entry.logprob))
        alternatives = {text: finite(entry.logprob)}
        for alt, logprob in entry.top[:top]:
            alternatives.setdefault(name(alt), finite(logprob))
        out["top_logprobs"].append(alternatives)
    return out


def chat_logprobs(entries: Sequence[TokenLogprob], top: int, name: Callable[[int], str]) -> dict:
    """OpenAI's chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""

    def item(token: int, logprob: float) -> dict:
        text = name(token)
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:top]]}
                        for e in entries], "refusal": None}
