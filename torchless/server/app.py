"""The OpenAI-compatible HTTP API (Starlette; server-sent events for streaming).

``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``. Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with the matching status.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import TorchlessError
from .scheduler import NotRunningError, QueueFullError, Request, SamplingParams, Scheduler

ROLES = {"system", "developer", "user", "assistant", "tool"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status, message, type_="invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}}, status_code=status)


def _bad(message, param=None, code=None):
    return APIError(400, message, param=param, code=code)


# ---- request validation --------------------------------------------------------------------
def _number(body, name, lo, hi, default, integer=False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise _bad(f"'{name}' must be {kind} in [{lo}, {hi}], got {v!r}", name)
    return v


def _sampling(body, chat: bool, n_prompt: int, ctx: int) -> SamplingParams:
    n = _number(body, "n", 1, 1, 1, integer=True)
    assert n == 1
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0, 0.0):
            raise _bad(f"'{name}' is not supported (only 0)", name)
    room = ctx - n_prompt
    if room <= 0:
        raise _bad(f"This model's maximum context length is {ctx} tokens (--ctx). However, "
                   f"your {'messages' if chat else 'prompt'} resulted in {n_prompt} tokens.",
                   "messages" if chat else "prompt", "context_length_exceeded")
    mt_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _number(body, mt_name, 1, 1 << 30, None, integer=True)
    if max_tokens is None:
        max_tokens = room if chat else 16  # OpenAI's legacy completions default to 16
        max_tokens = min(max_tokens, room)
    elif max_tokens > room:
        raise _bad(f"This model's maximum context length is {ctx} tokens (--ctx). However, "
                   f"you requested {n_prompt + max_tokens} tokens ({n_prompt} in the "
                   f"{'messages' if chat else 'prompt'}, {max_tokens} in the completion).",
                   mt_name, "context_length_exceeded")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and len(stop) <= 16
              and all(isinstance(s, str) for s in stop)):
        raise _bad("'stop' must be a string or a list of at most 16 strings", "stop")
    if chat:
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise _bad("'logprobs' must be a boolean", "logprobs")
        top = _number(body, "top_logprobs", 0, 20, 0, integer=True)
        if top and not lp:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = bool(lp)
    else:
        lp = _number(body, "logprobs", 0, 5, None, integer=True)
        logprobs, top = lp is not None, lp or 0
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") != "text":
            raise _bad("only response_format {'type': 'text'} is supported", "response_format")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad(f"'seed' must be an integer, got {seed!r}", "seed")
    top_k = _number(body, "top_k", -1, 1 << 30, None, integer=True)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be a boolean", "ignore_eos")
    temperature = float(_number(body, "temperature", 0.0, 2.0, 1.0))
    top_p = float(_number(body, "top_p", 0.0, 1.0, 1.0))
    if top_p == 0.0:  # only the most likely token is left
        temperature = 0.0
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k if top_k and top_k > 0 else None,
        min_p=_number(body, "min_p", 0.0, 1.0, None),
        repetition_penalty=float(_number(body, "repetition_penalty", 0.01, 10.0, 1.0)),
        seed=seed if seed is None else int(seed) % (1 << 64), stop=stop, logprobs=logprobs,
        top_logprobs=top, ignore_eos=ignore_eos)


def _messages(body) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"messages[{i}] must be an object with a 'role' in "
                       f"{sorted(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # content parts: only text
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or \
                        not isinstance(part.get("text"), str):
                    raise _bad(f"messages[{i}].content: only text parts are supported",
                               f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts",
                       f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


# ---- the server ----------------------------------------------------------------------------
class Server:
    def __init__(self, model, model_name: str, parallel: int = 4, ctx: int = 2048,
                 api_key: str | None = None, queue_size: int | None = None):
        self.model = model
        self.model_name = model_name
        self.api_key = api_key
        self.created = int(time.time())
        self.scheduler = Scheduler(model, parallel=parallel, ctx=ctx, queue_size=queue_size)
        self._chat_eos = None

    # helpers
    def _check_auth(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(),
                                                                    self.api_key):
            raise APIError(401, "Incorrect API key provided" if header else
                           "You didn't provide an API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def _body(self, request: HTTPRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _bad("'model' must be a string", "model")
        if model and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                           f"'{self.model_name}'", param="model", code="model_not_found")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("'stream' must be a boolean", "stream")
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        return body

    def chat_eos(self):
        if self._chat_eos is None:
            from ..chat import end_of_turn_ids

            self._chat_eos = end_of_turn_ids(self.model)
        return self._chat_eos

    def _token_text(self, tok: int) -> str:
        return self.model.tokenizer.decode([tok], skip_special_tokens=False)

    # endpoints
    async def health(self, request):
        snap = self.scheduler.snapshot()
        if not self.scheduler.alive:
            return JSONResponse({"status": "error", "error": self.scheduler.failure, **snap},
                                status_code=503)
        return JSONResponse({"status": "ok", **snap})

    async def models(self, request):
        self._check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created,
             "owned_by": "torchless"}]})

    async def chat_completions(self, request):
        self._check_auth(request)
        body = await self._body(request)
        messages = _messages(body)
        from ..chat import encode_chat

        try:
            ids = encode_chat(self.model, messages)
        except TorchlessError as exc:
            raise _bad(str(exc), "messages") from None
        params = _sampling(body, True, len(ids), self.scheduler.ctx)
        return await self._run(request, body, ids, params, self.chat_eos(), chat=True)

    async def completions(self, request):
        self._check_auth(request)
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise _bad("'prompt' is empty", "prompt")
            ids = self.model.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            V = self.model.config.vocab_size
            bad = [t for t in prompt if not 0 <= t < V]
            if bad:
                raise _bad(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})",
                           "prompt")
            ids = list(prompt)
        else:
            raise _bad("'prompt' must be a string or a list of token ids (one prompt: n=1)",
                       "prompt")
        for name in ("echo", "suffix"):
            if body.get(name):
                raise _bad(f"'{name}' is not supported", name)
        if _number(body, "best_of", 1, 1, 1, integer=True) != 1:
            raise _bad("'best_of' must be 1", "best_of")
        params = _sampling(body, False, len(ids), self.scheduler.ctx)
        return await self._run(request, body, ids, params, self.model.config.eos_token_ids,
                               chat=False)

    # the generation
    async def _run(self, request, body, ids, params, eos, chat: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        req = Request(ids, params, eos, loop, queue)
        try:
            self.scheduler.submit(req)
        except QueueFullError as exc:
            raise APIError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded") \
                from None
        except NotRunningError as exc:
            raise APIError(503, str(exc), "server_error", code="unavailable") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            gen = self._stream(req, rid, created, chat, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        return await self._collect(request, req, rid, created, chat)

    def _logprobs_chat(self, infos):
        out = []
        for tok, lp, top in infos:
            s = self._token_text(tok)
            out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": self._token_text(t), "logprob": v,
                                          "bytes": list(self._token_text(t).encode())}
                                         for t, v in top]})
        return {"content": out}

    def _logprobs_completion(self, infos, offset0=0):
        tokens, lps, tops, offsets = [], [], [], []
        off = offset0
        for tok, lp, top in infos:
            s = self._token_text(tok)
            tokens.append(s)
            lps.append(lp)
            tops.append({self._token_text(t): v for t, v in top})
            offsets.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}

    @staticmethod
    def _usage(u):
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}

    async def _collect(self, request, req: Request, rid, created, chat):
        pieces, infos = [], []
        next_check = time.monotonic() + 0.2
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(req.queue.get(), 0.2)
                except asyncio.TimeoutError:
                    ev = None
                if time.monotonic() >= next_check:  # tokens may arrive faster than 0.2 s
                    next_check = time.monotonic() + 0.2
                    if await request.is_disconnected():
                        req.cancel()
                        return error_response(499, "client closed the request")
                if ev is None:
                    continue
                if ev[0] == "token":
                    pieces.append(ev[1])
                    if ev[2] is not None:
                        infos.append(ev[2])
                elif ev[0] == "error":
                    return error_response(500, ev[1], "server_error")
                else:
                    finish, usage = ev[1], ev[2]
                    break
        finally:
            req.cancel()  # no-op once done; frees the slot if the handler was cancelled
        text = "".join(pieces)
        lp = None
        if req.params.logprobs:
            lp = self._logprobs_chat(infos) if chat else self._logprobs_completion(infos)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": lp, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created,
                             "model": self.model_name, "system_fingerprint": "torchless",
                             "choices": [choice], "usage": self._usage(usage)})

    async def _stream(self, req: Request, rid, created, chat, include_usage):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice, usage=None):
            d = {"id": rid, "object": obj, "created": created, "model": self.model_name,
                 "system_fingerprint": "torchless", "choices": [choice] if choice else []}
            if include_usage:
                d["usage"] = usage
            return f"data: {json.dumps(d)}\n\n"

        offset = 0
        try:
            if chat:
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None})
            while True:
                ev = await req.queue.get()
                if ev[0] == "token":
                    piece, info = ev[1], ev[2]
                    if not piece and info is None:
                        continue
                    if chat:
                        lp = self._logprobs_chat([info]) if info else None
                        yield chunk({"index": 0, "delta": {"content": piece}, "logprobs": lp,
                                     "finish_reason": None})
                    else:
                        lp = self._logprobs_completion([info], offset) if info else None
                        yield chunk({"index": 0, "text": piece, "logprobs": lp,
                                     "finish_reason": None})
                    offset += len(piece)
                elif ev[0] == "error":
                    err = {"error": {"message": ev[1], "type": "server_error", "param": None,
                                     "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                else:
                    finish, usage = ev[1], ev[2]
                    if chat:
                        yield chunk({"index": 0, "delta": {}, "logprobs": None,
                                     "finish_reason": finish})
                    else:
                        yield chunk({"index": 0, "text": "", "logprobs": None,
                                     "finish_reason": finish})
                    if include_usage:
                        yield chunk(None, self._usage(usage))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            req.cancel()  # client gone (the task was cancelled) or done: free the slot

    # the ASGI app
    def app(self) -> Starlette:
        def wrap(fn):
            async def endpoint(request):
                try:
                    return await fn(request)
                except APIError as exc:
                    return exc.response()
                except ClientDisconnect:  # gone while its body was read: nobody to answer
                    return error_response(499, "client closed the request")
            return endpoint

        async def not_found(request, exc):
            return error_response(404, f"no route {request.method} {request.url.path}",
                                  code="not_found")

        async def method_not_allowed(request, exc):
            return error_response(405, f"method {request.method} not allowed on "
                                  f"{request.url.path}", code="method_not_allowed")

        async def server_error(request, exc):
            return error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                                  "server_error")

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.scheduler.start()
            try:
                yield
            finally:
                self.scheduler.stop()

        routes = [
            Route("/health", wrap(self.health), methods=["GET"]),
            Route("/v1/health", wrap(self.health), methods=["GET"]),
            Route("/v1/models", wrap(self.models), methods=["GET"]),
            Route("/v1/chat/completions", wrap(self.chat_completions), methods=["POST"]),
            Route("/v1/completions", wrap(self.completions), methods=["POST"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan,
                         exception_handlers={404: not_found, 405: method_not_allowed,
                                             500: server_error})
