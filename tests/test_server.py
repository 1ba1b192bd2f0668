"""``torchless serve`` as a real process on 127.0.0.1, driven by the official ``openai`` client
(sync and async, streaming and not) and by raw HTTP for the errors.

Every text is checked against the library's own greedy decoding of the same prompt, alone
(``prefill`` then ``fast_forward``): the server must give each request exactly that, whatever
runs beside it and whatever its slot held before.
"""
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import torchless  # noqa: E402
from torchless.chat import encode_chat, end_of_turn_ids  # noqa: E402
from conftest import FIXTURES  # noqa: E402

KEY = "test-key-123"
CTX = 4096
PARALLEL = 8
QUEUE = 2
# the fixture's tokenizer has ChatML's special tokens; the template is written into the copy
# so that the test does not depend on where chat.py finds a template
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["apples", "rivers", "engines", "violins", "glaciers", "lanterns", "comets", "marbles"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / "tiny-chat"
    shutil.copytree(FIXTURES / "qwen2_tied", d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


@pytest.fixture(scope="module")
def server(model_dir):
    port = _free_port()
    cmd = [sys.executable, "-m", "torchless.cli", "serve", str(model_dir), "--host",
           "127.0.0.1", "--port", str(port), "--parallel", str(PARALLEL), "--ctx", str(CTX),
           "--api-key", KEY, "--queue", str(QUEUE)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a cold Numba cache compiles the kernels first
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("server did not become healthy in 180 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def ref_model(model_dir):
    m = torchless.ModelLoader.load_auto(model_dir)
    m.config.eos_token_ids = tuple(end_of_turn_ids(m))  # a chat reply ends at <|im_end|>
    return m


def reference(model, messages, max_tokens):
    """Greedy alone: (text, token count, logits per step) for a chat."""
    ids = encode_chat(model, messages)
    n = len(model.generate(ids, max_new_tokens=max_tokens))
    text = "".join(model.stream(ids, max_new_tokens=max_tokens))
    state = model.new_state()
    logits = [model.prefill(state, ids).copy()]
    for _ in range(n - 1):
        logits.append(model.fast_forward(state, int(np.argmax(logits[-1]))).copy())
    return text, n, logits


def chat(word):
    return [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"Tell me about {word}."}]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def model_id(client):
    return client.models.list().data[0].id


def health(server):
    return httpx.get(server + "/health", timeout=5).json()


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-chat"]
    h = health(server)
    assert h["status"] == "ok" and h["slots_total"] == PARALLEL and h["ctx"] == CTX


def test_chat_matches_library(client, model_id, ref_model):
    text, n, _ = reference(ref_model, chat("apples"), 24)
    r = client.chat.completions.create(model=model_id, messages=chat("apples"), max_tokens=24,
                                       temperature=0)
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if n == 24 else "stop")
    assert r.usage.completion_tokens == n
    assert r.usage.prompt_tokens == len(encode_chat(ref_model, chat("apples")))
    assert r.usage.total_tokens == r.usage.prompt_tokens + n


def test_completions_stream_and_usage(client, model_id, ref_model):
    prompt = "Once upon a time"
    m = ref_model
    want = "".join(m.stream(prompt, max_new_tokens=20, ignore_eos=True))
    chunks = list(client.completions.create(model=model_id, prompt=prompt, max_tokens=20,
                                            temperature=0, stream=True, extra_body={
                                                "ignore_eos": True},
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.usage.completion_tokens == 20


def test_stop_string_and_logprobs(client, model_id, ref_model):
    text, n, logits = reference(ref_model, chat("rivers"), 30)
    r = client.chat.completions.create(model=model_id, messages=chat("rivers"), max_tokens=30,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == n
    for entry, lg in zip(content, logits):
        x = lg.astype(np.float64)
        lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        top = np.argsort(-lp)[:3]
        assert entry.logprob == pytest.approx(lp[top[0]], abs=1e-4)  # greedy: the argmax
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(lp[top], abs=1e-4)
    visible = text.strip()
    assert len(visible) >= 6, "the fixture's reply is too short for a stop-string test"
    stop = visible[len(visible) // 2:len(visible) // 2 + 2]
    r = client.chat.completions.create(model=model_id, messages=chat("rivers"), max_tokens=30,
                                       temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[:text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    # streamed, the text stops at the same place (pieces held back across token boundaries)
    s = client.chat.completions.create(model=model_id, messages=chat("rivers"), max_tokens=30,
                                       temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s) == text[:text.find(stop)]


def test_eight_concurrent_streams_match_alone(server, model_id, ref_model):
    refs = [reference(ref_model, chat(w), 40)[:2] for w in WORDS]

    async def one(client, word):
        stream = await client.chat.completions.create(
            model=model_id, messages=chat(word), max_tokens=40, temperature=0, stream=True,
            stream_options={"include_usage": True})
        pieces, usage = [], None
        async for c in stream:
            if c.choices:
                pieces.append(c.choices[0].delta.content or "")
            if c.usage:
                usage = c.usage
        return "".join(pieces), usage.completion_tokens

    async def main():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0,
                                      timeout=60) as client:
            return await asyncio.gather(*(one(client, w) for w in WORDS))

    before = health(server)
    got = asyncio.run(main())
    after = health(server)
    assert got == refs
    steps = after["steps"] - before["steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    assert rows / steps > 2, f"the streams were not decoded together ({rows} rows, {steps} steps)"


def test_async_non_streaming(server, model_id, ref_model):
    async def main():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0,
                                      timeout=60) as client:
            return await client.chat.completions.create(model=model_id, messages=chat("comets"),
                                                        max_tokens=16, temperature=0)
    r = asyncio.run(main())
    assert r.choices[0].message.content == reference(ref_model, chat("comets"), 16)[0]


def test_prefix_cache_second_turn(client, model_id, ref_model):
    msgs = chat("lanterns") + [{"role": "user", "content": "More, please."}]
    first = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=12,
                                           temperature=0)
    msgs2 = msgs + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model=model_id, messages=msgs2, max_tokens=12,
                                            temperature=0)
    n1 = first.usage.prompt_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= n1, (cached, n1)  # at least the whole first prompt was reused
    assert cached < second.usage.prompt_tokens
    assert second.choices[0].message.content == reference(ref_model, msgs2, 12)[0]


def test_seeded_sampling_is_per_request(server, model_id):
    kw = dict(model=model_id, messages=chat("marbles"), max_tokens=16, temperature=1.0,
              top_p=0.9)

    async def main():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0,
                                      timeout=60) as client:
            alone = await client.chat.completions.create(seed=7, **kw)
            together = await asyncio.gather(
                client.chat.completions.create(seed=7, **kw),
                client.chat.completions.create(seed=8, **kw),
                client.chat.completions.create(seed=7, **kw))
            return alone, together
    alone, (a, b, c) = asyncio.run(main())
    texts = [x.choices[0].message.content for x in (alone, a, b, c)]
    assert texts[0] == texts[1] == texts[3]


def _post(server, path, body=None, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(server + path, content=content, headers=headers, timeout=30)


@pytest.mark.parametrize("body, raw, key, status, needle", [
    (None, b"{not json", KEY, 400, "not valid JSON"),
    (None, b"[1, 2]", KEY, 400, "JSON object"),
    ({"messages": "hi"}, None, KEY, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, None, KEY, 400, "role"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, None, KEY, 400,
     "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, None, KEY, 400, "'n'"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, None, KEY, 400,
     "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     None, KEY, 400, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": CTX}, None, KEY, 400,
     f"maximum context length is {CTX}"),
    ({"messages": [{"role": "user", "content": "word " * CTX}]}, None, KEY, 400,
     f"maximum context length is {CTX}"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, None, KEY, 404,
     "gpt-4"),
    ({"messages": [{"role": "user", "content": "x"}]}, None, None, 401, "API key"),
    ({"messages": [{"role": "user", "content": "x"}]}, None, "wrong", 401, "API key"),
])
def test_chat_errors(server, body, raw, key, status, needle):
    r = _post(server, "/v1/chat/completions", body, key=key, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and {"type", "param", "code"} <= set(err)


def test_completion_errors_and_routes(server):
    r = _post(server, "/v1/completions", {"prompt": [1, 10**6]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"prompt": 5})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = httpx.get(server + "/v1/nothing", timeout=5)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server + "/v1/models", timeout=5)  # no key
    assert r.status_code == 401


def _wait_idle(server, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(server)
        if h["slots_processing"] == 0 and h["queued"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"slots still busy after {timeout} s: {health(server)}")


LONG = {"messages": chat("glaciers"), "max_tokens": CTX - 64, "temperature": 0,
        "ignore_eos": True}


def test_disconnect_frees_the_slot(server):
    before = health(server)
    hdr = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30) as c:  # streaming: read a little, hang up
        with c.stream("POST", server + "/v1/chat/completions", headers=hdr,
                      json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    h = _wait_idle(server, 2.0)
    # non-streaming: the client gives up after a moment
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server + "/v1/chat/completions", headers=hdr, json=LONG, timeout=0.5)
    h = _wait_idle(server, 2.0)
    # neither request ran to its end
    assert h["decode_rows"] - before["decode_rows"] < LONG["max_tokens"]


def test_overload_is_429_not_a_hang(server):
    hdr = {"Authorization": f"Bearer {KEY}"}

    async def main():
        async with httpx.AsyncClient(timeout=30) as c:
            async with contextlib.AsyncExitStack() as stack:
                streams = []
                for _ in range(PARALLEL + QUEUE):  # every slot, then the queue
                    r = await stack.enter_async_context(c.stream(
                        "POST", server + "/v1/chat/completions", headers=hdr,
                        json={**LONG, "stream": True}))
                    streams.append(r.status_code)
                extra = await c.post(server + "/v1/chat/completions", headers=hdr, json=LONG)
                return streams, extra.status_code, extra.json()
    streams, status, body = asyncio.run(main())
    assert streams == [200] * (PARALLEL + QUEUE)
    assert status == 429 and "busy" in body["error"]["message"]
    _wait_idle(server, 5.0)  # the hung-up streams were all freed
