"""`shardnet api` end to end: a real SmolLM2 swarm, the gateway in a real uvicorn server on 127.0.0.1, and
the official ``openai`` client (plus raw HTTP where we need the wire)."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import psutil
import pytest
import torch
from openai import OpenAI

from shardnet import ShardedModel
from shardnet.client.swarm_status import unique_servers
from shardnet.gateway import GatewayServer, create_app
from shardnet.gateway.serving import load_tokenizer
from shardnet.wire import pb, pb_grpc

from .conftest import make_llama

pytestmark = pytest.mark.timeout(240)

NAME = "smollm2"
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def swarm(smollm2_swarm):
    return smollm2_swarm


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def models(swarm, smollm2_path):
    """Every client this module needs, made before any gRPC call (hivemind forks its DHT process):
    the gateway's, a reference for ShardedModel.generate, and one that may use no server at all."""
    gateway_model = ShardedModel.from_pretrained(smollm2_path, initial_peers=swarm.initial_peers)
    reference = ShardedModel.from_pretrained(smollm2_path, initial_peers=swarm.initial_peers)
    peers = [v.record.peer_id for v in unique_servers(reference.swarm.servers())]
    assert len(peers) == 2
    blocked = ShardedModel.from_pretrained(
        smollm2_path, initial_peers=swarm.initial_peers, blocked_servers=peers[:1], route_timeout_s=1.0
    )
    yield gateway_model, reference, blocked
    for model in (blocked, reference, gateway_model):
        model.close()


@pytest.fixture(scope="module")
def gateway(models, tokenizer):
    with GatewayServer(create_app(models[0], tokenizer, NAME)) as server:
        yield server


@pytest.fixture(scope="module")
def client(gateway) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=120)


def _post(gateway, path: str, body) -> http.client.HTTPResponse:
    """A raw POST (bytes or a JSON document) on a new connection; the caller reads and closes."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=120)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
    return connection.getresponse()


def _chat_ids(tokenizer, question: str) -> torch.Tensor:
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    return encoded["input_ids"]  # [1, prompt]


def _greedy(model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> tuple[str, int]:
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.fixture(scope="module")
def greedy_chat(models, tokenizer) -> tuple[str, int, int]:
    """(text, completion tokens, prompt tokens) of ShardedModel.generate on the chat prompt, greedy."""
    ids = _chat_ids(tokenizer, QUESTION)
    text, count = _greedy(models[1], tokenizer, ids, 24)
    return text, count, ids.shape[1]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_chat_greedy_equals_generate_streaming_and_not(client, greedy_chat):
    text, count, prompt_tokens = greedy_chat
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("length" if count == 24 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, count)
    assert reply.usage.total_tokens == prompt_tokens + count

    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [reply.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == count


def test_completions_greedy_equals_generate(client, models, tokenizer):
    prompt = "The three primary colors are"
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # [1, prompt]
    text, count = _greedy(models[1], tokenizer, ids, 12)
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == text
    assert reply.usage.completion_tokens == count and reply.usage.prompt_tokens == ids.shape[1]
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_sse_wire_format(gateway):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    response = _post(gateway, "/v1/chat/completions", body)
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    raw = response.read().decode()
    response.close()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event.removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_n_choices_with_a_seed_are_reproducible(client):
    def ask():
        reply = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "Name an animal."}],
            max_tokens=8,
            temperature=1.0,
            top_p=0.95,
            n=2,
            seed=1234,
        )
        assert [c.index for c in reply.choices] == [0, 1]
        return [c.message.content for c in reply.choices]

    first = ask()
    assert ask() == first
    assert all(first)


def test_stop_string_is_cut_and_finishes_with_stop(client, greedy_chat):
    text = greedy_chat[0]
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    want = text[: text.index(stop)]
    reply = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        temperature=0,
        stop=[stop],
    )
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        temperature=0,
        stop=stop,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def test_bad_requests_get_openai_errors_and_the_gateway_keeps_serving(client, gateway):
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=-1)
    assert bad.value.status_code == 400
    error = bad.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=messages, max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    for body in (b"{not json", json.dumps({"model": NAME, "messages": []}).encode()):
        response = _post(gateway, "/v1/chat/completions", body)
        error = json.loads(response.read())["error"]
        assert response.status == 400, error
        assert set(error) == {"message", "type", "param", "code"}
    response = _post(gateway, "/v1/completions", {"model": NAME, "prompt": "x", "temperature": 5})
    assert response.status == 400 and json.loads(response.read())["error"]["param"] == "temperature"
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens >= 1


def test_no_route_is_503_naming_the_missing_blocks(models, tokenizer):
    with GatewayServer(create_app(models[2], tokenizer, NAME)) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as failed:
                client.chat.completions.create(
                    model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=stream
                )
            assert failed.value.status_code == 503
            assert (
                "blocks 0:15" in failed.value.body["message"]
                or "blocks 15:30" in failed.value.body["message"]
            )
            assert failed.value.body["code"] == "no_route"


def test_concurrent_requests_each_get_their_answer(client, greedy_chat):
    text = greedy_chat[0]

    def ask(_):
        reply = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0
        )
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert list(pool.map(ask, range(3))) == [text] * 3


def _open_sessions(model) -> int:
    total = 0
    for view in unique_servers(model.swarm.servers()):
        with grpc.insecure_channel(view.address) as channel:
            total += pb_grpc.ShardStub(channel).Info(pb.InfoRequest(), timeout=10).open_sessions
    return total


def test_client_disconnect_stops_generation_and_frees_sessions(gateway, models):
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 1000,
        "temperature": 0,
        "stream": True,
    }
    response = _post(gateway, "/v1/chat/completions", body)
    assert response.status == 200
    got = [response.readline() for _ in range(8)]
    assert [line for line in got if line.strip()][0].startswith(b"data: ")
    assert _open_sessions(models[1]) == 2  # one session on each of the two servers
    response.close()  # the client goes away mid-answer
    left = time.monotonic()
    deadline = time.monotonic() + 20
    while _open_sessions(models[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _open_sessions(models[1]) == 0
    print(f"sessions closed {time.monotonic() - left:.2f} s after the client left")


def _shardnet(*args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "shardnet", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _line_with(process: subprocess.Popen, marker: str, timeout_s: float) -> str:
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline, seen = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        if selector.select(timeout=1.0):
            line = process.stdout.readline()
            assert line, (
                f"exited with {process.wait()} before {marker!r}: {seen} {process.stderr.read()[-2000:]}"
            )
            seen.append(line)
            if marker in line:
                return line
    process.kill()
    pytest.fail(f"no {marker!r} in {timeout_s}s: {seen}")


def _served_models(base_url: str) -> list[str]:
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=30) as response:
        return [m["id"] for m in json.loads(response.read())["data"]]


@pytest.mark.slow  # the default suite must stay under 10 minutes: README "Tests" says what covers it
def test_api_command_serves_until_sigterm(swarm, smollm2_path):
    process = _shardnet(
        "api", "--model", str(smollm2_path), "--initial-peers", *swarm.initial_peers, "--port", "0",
        "--model-name", "tiny",
    )  # fmt: skip
    try:
        url = _line_with(process, "http://127.0.0.1:", timeout_s=120).strip()
        assert url.endswith("/v1")
        assert _served_models(url.removesuffix("/v1")) == ["tiny"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.stderr.read()[-2000:]
        log = process.stderr.read()  # INFO lines only: no warning from transformers or anyone in normal use
        assert " WARNING " not in log and "Warning:" not in log, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--model", "/nonexistent", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x"), ["/nonexistent"]),
        (("--model", "/tmp", "--port", "x"), ["--port"]),
    ],
)
def test_bad_api_flags_are_one_line_exit_2(args, words):
    process = _shardnet("api", *args)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and all(word in lines[0] for word in words), err


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2_path, tmp_path_factory) -> Path:
    """A 2-block random Llama with SmolLM2's tokenizer and chat template: starts in seconds, answers junk."""
    path = tmp_path_factory.mktemp("tiny_chat")
    tokenizer = load_tokenizer(smollm2_path)
    make_llama(path, num_hidden_layers=2, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow  # before a release: pytest -m slow (README "Tests")
def test_demo_api_serves_then_stops_everything(tiny_with_tokenizer):
    process = _shardnet(
        "demo", "--api", "--port", "0", "--servers", "2", "--model", str(tiny_with_tokenizer),
        start_new_session=True,
    )  # fmt: skip
    try:
        line = _line_with(process, "chat page: ", timeout_s=180)
        children = psutil.Process(process.pid).children(recursive=True)
        base = line.split()[2].rstrip("/")
        assert _served_models(base) == [tiny_with_tokenizer.name]
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C at a terminal
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err[-2000:]
        assert "Traceback" not in err, err[-3000:]
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_swarm_document_is_status_json_plus_the_route(gateway, swarm, client):
    reply = client.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)  # some timings
    with urllib.request.urlopen(f"{gateway.url}/api/swarm", timeout=30) as response:
        document = json.loads(response.read())
    status = {"model_id", "architecture", "num_blocks", "servers", "blocks_without_online_server"}
    assert status <= set(document)
    assert document["num_blocks"] == 30 and document["blocks_without_online_server"] == []
    assert sorted(s["span"] for s in document["servers"]) == ["0:15", "15:30"]
    assert [hop["span"] for hop in document["route"]] == ["0:15", "15:30"]
    recent = document["recent"]
    assert recent["steps"] and [hop["span"] for hop in recent["steps"][-1]["hops"]] == ["0:15", "15:30"]
    assert recent["steps"][-1]["positions"] == 1 and recent["steps"][-1]["step_ms"] > 0
    latest = recent["series"]["choices"][-1]
    assert (
        latest["tokens"] == reply.usage.completion_tokens
        and latest["ttft_ms"] > 0
        and latest["tokens_per_s"] > 0
    )
    assert {point["span"] for point in recent["series"]["hops"]} == {"0:15", "15:30"}
    for page, marker in (
        ("/", b"chat.js"),
        ("/swarm", b"swarm.js"),
        ("/static/chat.js", b"/v1/chat/completions"),
    ):
        with urllib.request.urlopen(f"{gateway.url}{page}", timeout=30) as response:
            assert marker in response.read()


def _scrape(gateway) -> dict[tuple[str, tuple], float]:
    """``curl`` of the gateway's /metrics, parsed by prometheus_client: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = subprocess.run(
        ["curl", "-s", "--fail", f"{gateway.url}/metrics"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _moved(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_what_the_gateway_generated(client, gateway):
    before = _scrape(gateway)
    assert ("shardnet_api_failovers_total", ()) in before
    assert ("shardnet_api_suspected_servers", ()) in before
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usages = [reply.usage, chunks[-1].usage]
    urllib.request.urlopen(f"{gateway.url}/v1/models", timeout=30).close()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{gateway.url}/no/such/page", timeout=30)
    after = _scrape(gateway)

    tokens = [u.completion_tokens for u in usages]
    assert all(tokens), usages
    assert _moved(before, after, "shardnet_api_generated_tokens_total") == sum(tokens)
    assert _moved(before, after, "shardnet_api_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    chat = {"route": "/v1/chat/completions", "status": "200"}
    assert _moved(before, after, "shardnet_api_requests_total", **chat) == 2
    assert _moved(before, after, "shardnet_api_requests_total", route="/v1/models", status="200") == 1
    assert _moved(before, after, "shardnet_api_requests_total", route="other", status="404") == 1
    assert _moved(before, after, "shardnet_api_requests_total", route="/metrics", status="200") == 1
    assert _moved(before, after, "shardnet_api_time_to_first_token_seconds_count") == len(usages)
    assert _moved(before, after, "shardnet_api_inter_token_latency_seconds_count") == sum(
        t - 1 for t in tokens
    )
    assert _moved(before, after, "shardnet_api_time_to_first_token_seconds_sum") > 0
    assert _moved(before, after, "shardnet_api_failovers_total") == 0
