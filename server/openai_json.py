"""OpenAI JSON <-> loraserve.v1 messages: the HTTP front's only translation.

Requests become a GenerateRequest, which the gRPC edge then validates (ranges, limits, the
adapter) exactly as it does a gRPC call; here only the JSON's shape is checked, and errors name
the OpenAI parameter. Answers are built from GenerateResponse / GenerateStreamResponse, so what
the HTTP front returns is what gRPC returned for the same request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from loraserve.contract import BASE_ADAPTER_ID
from loraserve.v1 import inference_pb2 as pb
from loraserve.scheduler.errors import InvalidArgument

UINT32 = 2**32
UINT64 = 2**64
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""OpenAI's roles -> the contract's (OpenAI's newer "developer" is the system prompt)."""

PARAMS = {"adapter_id": "model", "max_new_tokens": "max_tokens", "stop_sequences": "stop",
          "min_new_tokens": "min_tokens", "prompt_token_ids": "prompt"}
"""GenerateRequest field -> the OpenAI parameter an error about it names (others are spelled alike)."""

REFUSED = {
    # Non-default values of these are refused (400 naming the parameter), never silently dropped:
    # the answer would not be what the caller asked for.
    "completions": ("suffix", "logit_bias", "echo"),
    "chat": ("logit_bias", "tools", "functions", "function_call", "audio", "prediction", "web_search_options"),
}
FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_EOS: "stop", pb.FINISH_REASON_STOP_SEQUENCE: "stop"}


@dataclass
class Call:
    """One HTTP request's parameters beyond the GenerateRequest: how to shape the answer."""

    chat: bool
    model: str
    """As the caller named it: the `model` of stream chunks sent before the serving version is known."""
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    request: pb.GenerateRequest = field(default_factory=pb.GenerateRequest)


def param(field_name: str, chat: bool) -> str:
    """The OpenAI parameter an error about GenerateRequest field `field_name` names."""
    if field_name == "prompt" and chat:
        return "messages"
    if field_name == "logprobs" and chat:
        return "top_logprobs"
    return PARAMS.get(field_name.split(".", 1)[0], field_name)


# -- requests -------------------------------------------------------------------------------------

def _number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise InvalidArgument(name, "must be a number")
    return v


def _integer(body: dict, name: str, below: int = UINT32) -> int | None:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < below):
        raise InvalidArgument(name, f"must be an integer in 0..{below - 1}")
    return v


def _boolean(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise InvalidArgument(name, "must be true or false")
    return bool(v)


def _token_ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompt(req: pb.GenerateRequest, prompt) -> None:
    """A string, or a list of token ids; a batch of prompts ([str] or [[int]]) of exactly one."""
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _token_ids(prompt[0])):
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.prompt = prompt
    elif _token_ids(prompt) and all(0 <= t < UINT32 for t in prompt):
        req.prompt_token_ids.extend(prompt)
    else:
        raise InvalidArgument("prompt", "must be a string or a list of token ids (one prompt per request; "
                                        "`n` asks for several completions of it)")


def _content(content, where: str) -> str:
    """A message's text: a string, or a list of text parts (no images, audio or files)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InvalidArgument(f"{where}.content", "must be a string or a list of text parts")


def _messages(req: pb.GenerateRequest, messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidArgument(f"{where}.role", f"must be one of {', '.join(ROLES)} (tool calls are not "
                                                   "supported)")
        if m.get("tool_calls"):
            raise InvalidArgument(f"{where}.tool_calls", "tool calls are not supported")
        req.messages.add(role=ROLES[m["role"]], content=_content(m.get("content"), where))


def _response_format(req: pb.GenerateRequest, fmt) -> None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        req.response_format.json_object.SetInParent()
    elif kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else None
        if not isinstance(schema, dict):
            raise InvalidArgument("response_format", "json_schema needs {\"schema\": {...}}")
        req.response_format.json_schema = json.dumps(schema)
    elif kind != "text":
        raise InvalidArgument("response_format", "type must be text, json_object or json_schema")


def _refuse_unsupported(body: dict, chat: bool) -> None:
    for name in REFUSED["chat" if chat else "completions"]:
        if body.get(name) not in (None, False, "", {}, []):
            raise InvalidArgument(name, "is not supported by this server")
    n = body.get("n") or 1
    if not chat and body.get("best_of") not in (None, 1, n):
        raise InvalidArgument("best_of", "is not supported (only best_of equal to n)")
    if chat and body.get("tool_choice") not in (None, "none", "auto"):
        raise InvalidArgument("tool_choice", "tools are not supported")
    if chat and body.get("modalities") not in (None, ["text"]):
        raise InvalidArgument("modalities", "only [\"text\"] is supported")


def to_request(body, chat: bool) -> Call:
    """A /v1/completions (chat=False) or /v1/chat/completions body -> the call; InvalidArgument
    naming the OpenAI parameter when its shape is wrong."""
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model", "is required: an adapter id, alias, name@VERSION or 'base'")
    _refuse_unsupported(body, chat)
    call = Call(chat=chat, model=model, stream=_boolean(body, "stream"))
    req = call.request
    req.adapter_id = model
    if chat:
        _messages(req, body.get("messages"))
    else:
        _prompt(req, body.get("prompt"))
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or not call.stream:
            raise InvalidArgument("stream_options", "is an object, and only for stream: true")
        call.include_usage = _boolean(opts, "include_usage")
    max_tokens = _integer(body, "max_completion_tokens") if chat else None
    req.max_new_tokens = max_tokens if max_tokens is not None else (_integer(body, "max_tokens") or 0)
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if (v := _number(body, name)) is not None:
            setattr(req, name, v)
    for name, target in (("top_k", "top_k"), ("min_tokens", "min_new_tokens")):
        if (v := _integer(body, name)) is not None:
            setattr(req, target, v)
    if (seed := _integer(body, "seed", UINT64)) is not None:
        req.seed = seed
    req.n = _integer(body, "n") or 0
    req.ignore_eos = _boolean(body, "ignore_eos")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise InvalidArgument("stop", "must be a string or a list of strings")
    req.stop_sequences.extend(stops or ())
    if body.get("response_format") is not None:
        _response_format(req, body["response_format"])
    _logprobs(call, body)
    return call


def _logprobs(call: Call, body: dict) -> None:
    if not call.chat:  # completions: logprobs is the number of alternatives
        if (n := _integer(body, "logprobs")) is not None:
            call.logprobs, call.request.logprobs = True, n
        return
    top = _integer(body, "top_logprobs")
    if _boolean(body, "logprobs"):
        call.logprobs, call.request.logprobs = True, top or 0
    elif top is not None:
        raise InvalidArgument("top_logprobs", "needs logprobs: true")


# -- answers --------------------------------------------------------------------------------------

def served_model(adapter: pb.AdapterInfo) -> str:
    """The `model` of an answer: the adapter id and the version that served, e.g. legal@3."""
    return adapter.id if not adapter.version or adapter.version == "-" else f"{adapter.id}@{adapter.version}"


def models(listed: pb.ListModelsResponse) -> list[dict]:
    """ListModels' answer as OpenAI model objects: `base`, then per adapter its id and aliases
    (`root`: the version they are served by) and id@VERSION of each servable version."""
    def model(ident: str, root: str, parent: str | None = BASE_ADAPTER_ID) -> dict:
        return {"id": ident, "object": "model", "created": 0, "owned_by": "loraserve", "root": root,
                "parent": parent, "max_model_len": listed.base.max_context}

    out = [model(BASE_ADAPTER_ID, listed.base.id, None)]
    for a in listed.adapters:
        if a.version:
            key = f"{a.id}@{a.version}"
            out += [model(ident, key) for ident in (a.id, *a.aliases, key)]
        out += [model(f"{a.id}@{v}", f"{a.id}@{v}") for v in a.versions]
    return out


def usage(u: pb.Usage) -> dict:
    return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
            "total_tokens": u.input_tokens + u.output_tokens}


def _text_logprobs(items, offset: int) -> dict:
    """Completions' shape: parallel lists; text_offset counts characters from the choice's start."""
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in items], "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [{a.token: a.logprob for a in t.top} for t in items], "text_offset": offsets}


def _chat_logprobs(items) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(a.token, a.logprob) for a in t.top]}
                        for t in items], "refusal": None}


def _choices(resp: pb.GenerateResponse) -> list:
    return list(resp.choices) or [pb.Choice(index=0, text=resp.text, finish_reason=resp.finish_reason,
                                            token_ids=resp.token_ids, logprobs=resp.logprobs)]


def completion(call: Call, resp: pb.GenerateResponse, created: int, fingerprint: str | None) -> dict:
    """The answer to a non-streaming request."""
    choices = []
    for c in _choices(resp):
        logprobs = None
        if call.logprobs:
            logprobs = _chat_logprobs(c.logprobs) if call.chat else _text_logprobs(c.logprobs, 0)
        one = {"index": c.index, "logprobs": logprobs, "finish_reason": FINISH.get(c.finish_reason)}
        if call.chat:
            one["message"] = {"role": "assistant", "content": c.text, "refusal": None}
        else:
            one["text"] = c.text
        choices.append(one)
    return {"id": _id(call, resp.request_id), "object": "chat.completion" if call.chat else "text_completion",
            "created": created, "model": served_model(resp.adapter), "system_fingerprint": fingerprint,
            "choices": choices, "usage": usage(resp.usage)}


def _id(call: Call, request_id: str) -> str:
    return f"{'chatcmpl' if call.chat else 'cmpl'}-{request_id}"


class Chunks:
    """A stream's GenerateStreamResponse messages -> OpenAI chunk objects (chat.completion.chunk
    or text_completion), in order; `end` gives the usage chunk and the [DONE] marker."""

    def __init__(self, call: Call, created: int, fingerprint: str | None):
        self._call, self._created, self._fingerprint = call, created, fingerprint
        self._model = call.model
        self._started: set[int] = set()
        self._offsets: dict[int, int] = {}
        self._usage: dict[int, pb.Usage] = {}
        self._id = ""

    def chunk(self, m: pb.GenerateStreamResponse) -> dict | None:
        call = self._call
        self._id = self._id or _id(call, m.request_id)
        if m.HasField("adapter"):
            self._model = served_model(m.adapter)
        if m.HasField("usage"):
            self._usage[m.index] = m.usage
        finish = FINISH.get(m.finish_reason)
        first = call.chat and m.index not in self._started
        if not (m.text or m.logprobs or finish or first):
            return None
        self._started.add(m.index)
        one: dict = {"index": m.index, "logprobs": None, "finish_reason": finish}
        if call.logprobs and m.logprobs:
            if call.chat:
                one["logprobs"] = _chat_logprobs(m.logprobs)
            else:
                one["logprobs"] = _text_logprobs(m.logprobs, self._offsets.get(m.index, 0))
        self._offsets[m.index] = self._offsets.get(m.index, 0) + len(m.text)
        if call.chat:
            one["delta"] = ({"role": "assistant", "content": m.text} if first else
                            {"content": m.text} if m.text else {})
        else:
            one["text"] = m.text
        return self._wrap([one])

    def _wrap(self, choices: list, **extra) -> dict:
        out = {"id": self._id, "object": "chat.completion.chunk" if self._call.chat else "text_completion",
               "created": self._created, "model": self._model, "system_fingerprint": self._fingerprint,
               "choices": choices}
        if self._call.include_usage:
            out["usage"] = None
        return {**out, **extra}

    def usage_chunk(self) -> dict | None:
        """stream_options.include_usage: the last chunk, no choices, the whole request's usage (the
        prompt once, every choice's output)."""
        if not self._call.include_usage:
            return None
        prompt = max((u.input_tokens for u in self._usage.values()), default=0)
        output = sum(u.output_tokens for u in self._usage.values())
        return self._wrap([], usage={"prompt_tokens": prompt, "completion_tokens": output,
                                     "total_tokens": prompt + output})
