"""OpenAI request bodies, checked: the body of each endpoint becomes a :class:`Job`, or a 400 that
names the parameter (the rules are in the package's docstring). Unknown fields are ignored."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

from .._client import usage as _usage
from .._client.config import is_number
from .._wire.protocol import MODELS
from .errors import Refusal, bad_request

#: Dated snapshots of the model, served as the model.
_ALIASES = {"gpt-4o-mini-2024-07-18": "gpt-4o-mini"}
_ROLES = ("system", "developer", "user", "assistant")


def _unsupported(param: str, what: str) -> Refusal:
    return bad_request(
        f"{what} are not supported: the service only answers with text",
        param=param,
        code="unsupported_parameter",
    )


class Job(NamedTuple):
    """A request for a reply, from any of the three endpoints."""

    kind: str  #: "chat", "completion" or "response"
    messages: list[dict[str, str]]
    model: str  #: as the client named it (a dated name is echoed back as it was asked)
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    max_tokens: Optional[int]
    max_tokens_param: str  #: the parameter that set ``max_tokens``
    echo: dict[str, Any]  #: fields a Response object repeats from its request


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


_TEXT_PARTS = ("input_text", "output_text", "text")


def _parse_content(content: object, where: str, role: str, parts: Sequence[str] = ("text",)) -> str:
    """A message's content as text: a string, or an array of text parts (joined)."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if not isinstance(content, list):
        raise bad_request(
            f"{where}.content must be a string or an array of text parts, not {_json_type(content)}",
            param=f"{where}.content",
        )
    texts = []
    for index, part in enumerate(content):
        at = f"{where}.content[{index}]"
        if not isinstance(part, dict):
            raise bad_request(f"{at} must be an object, not {_json_type(part)}", param=at)
        kind = part.get("type")
        if kind not in parts:
            raise bad_request(
                f"{at} is a {kind!r} part: the service takes text only "
                f'(parts like {{"type": "{parts[0]}", "text": "..."}})',
                param=at,
                code="unsupported_content",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(
                f"{at}.text must be a string, not {_json_type(text)}", param=f"{at}.text"
            )
        texts.append(text)
    return "".join(texts)


def _parse_messages(
    messages: object, param: str = "messages", parts: Sequence[str] = ("text",)
) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise bad_request(
            f"'{param}' must be an array of messages, not {_json_type(messages)}",
            param=param,
        )
    if not messages:
        raise bad_request(f"'{param}' is empty: give at least one message", param=param)
    parsed = []
    for index, message in enumerate(messages):
        where = f"{param}[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object, not {_json_type(message)}", param=where)
        role = message.get("role")
        if (
            role in ("tool", "function")
            or message.get("type", "message") != "message"
            or message.get("tool_calls")
            or message.get("function_call")
        ):
            raise _unsupported(where, "tool and function calls")
        if role not in _ROLES:
            raise bad_request(
                f"{where}.role must be one of {', '.join(_ROLES)}, not {role!r}",
                param=f"{where}.role",
            )
        assert isinstance(role, str)
        parsed.append(
            {"role": role, "content": _parse_content(message.get("content"), where, role, parts)}
        )
    return parsed


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise bad_request(
            "you must provide a model parameter ('model': 'gpt-4o-mini')", param="model"
        )
    if not isinstance(model, str):
        raise bad_request(f"'model' must be a string, not {_json_type(model)}", param="model")
    canonical(model)
    return model


def canonical(model: str) -> str:
    """The service's name of ``model`` (a dated snapshot's name is the model's)."""
    name = _ALIASES.get(model, model)
    if name not in MODELS:
        raise Refusal(
            404,
            f"the model {model!r} does not exist: this gateway serves {', '.join(MODELS)}",
            param="model",
            code="model_not_found",
        )
    return name


def _typed(body: Mapping[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    """``body[name]`` when it is null or one of ``kinds`` (never a bool for a number)."""
    value = body.get(name)
    if value is None:
        return None
    if not (isinstance(value, kinds) if bool in kinds else is_number(value, kinds)):
        raise bad_request(f"'{name}' must be {what}, not {_json_type(value)}", param=name)
    return value


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> None:
    value = _typed(body, name, (int, float), "a number")
    if value is not None and not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low:g} and {high:g}, not {value}", param=name)


def _integer(body: Mapping[str, Any], name: str, low: Optional[int] = None) -> Optional[int]:
    value: Optional[int] = _typed(body, name, (int,), "an integer")
    if value is not None and low is not None and value < low:
        raise bad_request(f"'{name}' must be at least {low}, not {value}", param=name)
    return value


def _cannot(name: str, why: str, code: str = "unsupported_parameter") -> Refusal:
    return bad_request(f"'{name}' is not supported: {why}", param=name, code=code)


#: Parameters that only tune how a reply is sampled: checked, then ignored (the service samples as
#: it does). name: (kinds, what, (low, high) or None)
_IGNORED: dict[str, tuple[tuple[type, ...], str, Optional[tuple[float, float]]]] = {
    "temperature": ((int, float), "a number", (0, 2)),
    "top_p": ((int, float), "a number", (0, 1)),
    "presence_penalty": ((int, float), "a number", (-2, 2)),
    "frequency_penalty": ((int, float), "a number", (-2, 2)),
    "seed": ((int,), "an integer", None),
    "user": ((str,), "a string", None),
    "metadata": ((dict,), "an object", None),
    "store": ((bool,), "true or false", None),
    "service_tier": ((str,), "a string", None),
    "parallel_tool_calls": ((bool,), "true or false", None),
    "prediction": ((dict,), "an object", None),
    "reasoning_effort": ((str,), "a string", None),
    "reasoning": ((dict,), "an object", None),
    "truncation": ((str,), "a string", None),
    "safety_identifier": ((str,), "a string", None),
    "prompt_cache_key": ((str,), "a string", None),
    "verbosity": ((str,), "a string", None),
}


def _check_ignored(body: Mapping[str, Any], names: Iterable[str]) -> None:
    for name in names:
        kinds, what, bounds = _IGNORED[name]
        if bounds is None:
            _typed(body, name, kinds, what)
        else:
            _number(body, name, *bounds)


_CHAT_IGNORED = (
    "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "user", "metadata",
    "store", "service_tier", "parallel_tool_calls", "prediction", "reasoning_effort",
    "safety_identifier", "prompt_cache_key", "verbosity",
)  # fmt: skip
_COMPLETION_IGNORED = (
    "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "user",
)  # fmt: skip
_RESPONSE_IGNORED = (
    "temperature", "top_p", "user", "metadata", "store", "service_tier", "parallel_tool_calls",
    "reasoning", "truncation", "safety_identifier", "prompt_cache_key",
)  # fmt: skip


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``."""
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request(
            f"'stream' must be true or false, not {_json_type(stream)}", param="stream"
        )
    options = _typed(body, "stream_options", (dict,), "an object") or {}
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise bad_request(
            f"'stream_options.include_usage' must be true or false, not {_json_type(include)}",
            param="stream_options.include_usage",
        )
    if options and not stream:
        raise bad_request(
            "'stream_options' is only allowed with 'stream': true", param="stream_options"
        )
    return stream, bool(include)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request(
            f"'stop' must be a string or an array of strings, not {_json_type(stop)}",
            param="stop",
        )
    if len(stop) > 4:
        raise bad_request(f"'stop' takes at most 4 strings, not {len(stop)}", param="stop")
    return tuple(stop)


def _limit(body: Mapping[str, Any], *names: str) -> tuple[Optional[int], str]:
    """The token budget of the first of ``names`` given, and its name."""
    for name in names:
        value = _integer(body, name, 1)
        if value is not None:
            if not _tokens():
                raise _cannot(
                    name,
                    "the tokenizer that enforces it is not installed "
                    '(pip install "aichatonline-sync[gateway]")',
                )
            return value, name
    return None, names[0]


def _n(body: Mapping[str, Any], name: str = "n") -> None:
    n = _integer(body, name)
    if n is not None and n != 1:
        raise bad_request(
            f"{name}={n} is not supported: the service gives one reply per request",
            param=name,
            code="unsupported_value",
        )


def _no_tools(body: Mapping[str, Any], names: Iterable[str] = ("tools", "functions")) -> None:
    for name in names:
        if body.get(name):
            raise _unsupported(name, "tools and functions")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise _unsupported(name, "tools and functions")


def _must_be_off(body: Mapping[str, Any], names: Iterable[str], why: str) -> None:
    """Parameters that change the reply in a way the service cannot: a 400 unless unset, null,
    false or empty."""
    for name in names:
        if body.get(name) not in (None, False, [], {}, ""):
            raise _cannot(name, why)


def _object(body: object) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {_json_type(body)}")
    return body


def parse_chat_request(body: object) -> Job:
    """Check a ``/v1/chat/completions`` body. Unknown fields are ignored."""
    body = _object(body)
    model = _model(body)
    stream, include_usage = _stream_flags(body)
    _n(body)
    _no_tools(body)
    _check_ignored(body, _CHAT_IGNORED)
    _must_be_off(body, ("logprobs", "top_logprobs"), "the service reports no log probabilities")
    _must_be_off(body, ("audio", "web_search_options"), "the service only answers with text")
    _must_be_off(body, ("logit_bias",), "the service cannot bias its sampling")
    modalities = _typed(body, "modalities", (list,), "an array")
    if modalities not in (None, ["text"]):
        raise _cannot("modalities", "the service only answers with text")
    response_format = _typed(body, "response_format", (dict,), "an object")
    if response_format is not None and response_format.get("type") != "text":
        raise _cannot(
            "response_format",
            f"the service cannot promise a {response_format.get('type')!r} reply; "
            'only {"type": "text"}',
        )
    stop = _stop(body)
    max_tokens, param = _limit(body, "max_completion_tokens", "max_tokens")
    messages = _parse_messages(body.get("messages"))
    return Job("chat", messages, model, stream, include_usage, stop, max_tokens, param, {})


def parse_completion_request(body: object) -> Job:
    """Check a ``/v1/completions`` body: its ``prompt`` is the user's message."""
    body = _object(body)
    model = _model(body)
    stream, include_usage = _stream_flags(body)
    _n(body)
    _n(body, "best_of")
    _check_ignored(body, _COMPLETION_IGNORED)
    _must_be_off(body, ("logprobs",), "the service reports no log probabilities")
    _must_be_off(body, ("echo",), "the service's reply does not repeat the prompt")
    _must_be_off(body, ("suffix",), "the service does not insert text")
    _must_be_off(body, ("logit_bias",), "the service cannot bias its sampling")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request(
            f"'prompt' must be a string (or an array of one string), not {_json_type(prompt)}"
            + (f" of {len(prompt)}" if isinstance(prompt, list) else ""),
            param="prompt",
        )
    stop = _stop(body)
    max_tokens, param = _limit(body, "max_tokens")
    messages = [{"role": "user", "content": prompt}]
    return Job("completion", messages, model, stream, include_usage, stop, max_tokens, param, {})


def parse_response_request(body: object) -> Job:
    """Check a ``/v1/responses`` body: stateless, text in and text out."""
    body = _object(body)
    model = _model(body)
    stream, _ = _stream_flags({"stream": body.get("stream")})
    _check_ignored(body, _RESPONSE_IGNORED)
    _no_tools(body, ("tools",))
    _must_be_off(
        body,
        ("previous_response_id", "conversation", "background", "prompt"),
        "this gateway is stateless: send the whole conversation in 'input'",
    )
    _must_be_off(body, ("include", "top_logprobs"), "the service reports nothing but text")
    text = _typed(body, "text", (dict,), "an object") or {}
    text_format = text.get("format")
    if text_format is not None and (
        not isinstance(text_format, dict) or text_format.get("type") != "text"
    ):
        raise bad_request(
            "'text.format' is not supported: the service only promises plain text "
            '({"type": "text"})',
            param="text.format",
            code="unsupported_parameter",
        )
    instructions = _typed(body, "instructions", (str,), "a string")
    messages = [{"role": "system", "content": instructions}] if instructions else []
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    else:
        messages += _parse_messages(given, "input", _TEXT_PARTS)
    max_tokens, param = _limit(body, "max_output_tokens")
    echo = {
        "instructions": instructions,
        "max_output_tokens": max_tokens,
        "metadata": body.get("metadata") or {},
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "user": body.get("user"),
    }
    return Job("response", messages, model, stream, False, (), max_tokens, param, echo)


def _tokens() -> bool:
    """Whether the tokenizer is installed (the ``gateway`` extra brings it)."""
    return _usage.tokens_available()
