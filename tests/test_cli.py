"""Bad flags and bad model folders exit non-zero with one line naming the problem, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from .conftest import make_llama


@pytest.fixture(scope="module")
def llama_24(tmp_path_factory):
    return make_llama(
        tmp_path_factory.mktemp("llama24"),
        num_hidden_layers=24,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardnet", *args], capture_output=True, text=True, timeout=120
    )


def _assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    ("blocks", "words"),
    [
        ("30:40", ["30:40", "24 blocks"]),
        ("5:5", ["5:5", "empty"]),
        ("abc", ["abc", "START:END"]),
        ("3", ["START:END"]),
    ],
)
def test_bad_span(llama_24, blocks, words):
    _assert_one_line_error(_run("serve", "--model", str(llama_24), "--blocks", blocks), *words)


def test_missing_model_folder(tmp_path):
    _assert_one_line_error(
        _run("serve", "--model", str(tmp_path / "nope"), "--blocks", "0:1"), "does not exist"
    )


def test_folder_without_config(tmp_path):
    _assert_one_line_error(_run("serve", "--model", str(tmp_path), "--blocks", "0:1"), "config.json")


def test_folder_without_weights(llama_24, tmp_path):
    (tmp_path / "config.json").write_text((llama_24 / "config.json").read_text())
    _assert_one_line_error(_run("serve", "--model", str(tmp_path), "--blocks", "0:1"), "safetensors")


def test_bad_dtype_and_unknown_flag(llama_24):
    _assert_one_line_error(
        _run("serve", "--model", str(llama_24), "--blocks", "0:1", "--dtype", "int8"), "--dtype"
    )
    _assert_one_line_error(_run("serve", "--model", str(llama_24), "--blocks", "0:1", "--bogus"), "--bogus")


def test_listen_everywhere_needs_announce_host(llama_24):
    _assert_one_line_error(
        _run("serve", "--model", str(llama_24), "--blocks", "0:1", "--host", "0.0.0.0"), "--announce-host"
    )


@pytest.mark.parametrize(
    ("value", "words"), [("0", ["between 1 and 65535"]), ("70000", ["70000"]), ("x", ["'x'"])]
)
def test_bad_announce_port(llama_24, value, words):
    result = _run("serve", "--model", str(llama_24), "--blocks", "0:1", "--announce-port", value)
    assert result.returncode == 2
    _assert_one_line_error(result, "--announce-port", *words)


@pytest.mark.parametrize(("value", "words"), [("70000", ["70000", "0 to 65535"]), ("x", ["x is not a port"])])
def test_bad_metrics_port(llama_24, value, words):
    result = _run("serve", "--model", str(llama_24), "--blocks", "0:1", "--metrics-port", value)
    assert result.returncode == 2
    _assert_one_line_error(result, "--metrics-port", *words)


def test_a_metrics_port_in_use_is_a_one_line_error(llama_24):
    """Found when the server starts listening, before it loads or announces anything."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = _run("serve", "--model", str(llama_24), "--blocks", "0:1", "--metrics-port", port)
    _assert_one_line_error(result, f"--metrics-port {port}", "cannot listen on 127.0.0.1")


def test_status_needs_peers(llama_24, monkeypatch):
    monkeypatch.delenv("SHARDNET_INITIAL_PEERS", raising=False)
    _assert_one_line_error(_run("status", "--model", str(llama_24)), "--initial-peers")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--session-idle-timeout", "0"),
        ("--max-chunk-tokens", "0"),
        ("--max-requests-per-s", "0"),
        ("--max-sessions-per-client", "0"),
        ("--max-cache-tokens-per-client", "-1"),
        ("--tls-cert", "cert.pem"),  # without --tls-key
    ],
)
def test_bad_pressure_limits(llama_24, flag, value):
    _assert_one_line_error(_run("serve", "--model", str(llama_24), "--blocks", "0:1", flag, value), flag)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import BertConfig

    BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path)
    result = _run("serve", "--model", str(tmp_path), "--blocks", "0:1")
    _assert_one_line_error(result, "'bert' is not supported", "llama", "gemma3_text", "gpt2", "qwen2_moe")


def test_a_swarm_key_file_others_can_read_is_refused(llama_24, tmp_path):
    from shardnet.swarm_key import SwarmKey

    key = tmp_path / "swarm.key"
    SwarmKey.generate().write(key)
    key.chmod(0o640)
    result = _run("serve", "--model", str(llama_24), "--blocks", "0:1", "--swarm-key-file", str(key))
    _assert_one_line_error(result, "accessible to other users", f"chmod 600 {key}")


def test_version_names_what_runs():
    import importlib.metadata
    import platform

    import shardnet

    result = _run("--version")
    assert result.returncode == 0 and not result.stderr, result.stderr
    installed = {
        name: importlib.metadata.version(name)
        for name in ("torch", "transformers", "hivemind", "grpcio", "protobuf")
    }
    assert result.stdout.splitlines() == [
        f"shardnet {shardnet.__version__}",
        f"python {platform.python_version()}",
        *(f"{name} {version}" for name, version in installed.items()),
    ]


@pytest.mark.parametrize(("command", "value"), [("api", "1.5"), ("chat", "often")])
def test_bad_verify_fraction(llama_24, command, value):
    peers = ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x"]
    result = _run(command, "--model", str(llama_24), *peers, "--verify-fraction", value)
    assert result.returncode == 2
    _assert_one_line_error(result, "--verify-fraction", value)


@pytest.mark.parametrize(
    ("flags", "words"),
    [(["--limit", "0"], ["--limit", "0"]), (["--batch-size", "x"], ["--batch-size"]), ([], ["--tasks"])],
)
def test_bad_eval_flags(llama_24, tmp_path, flags, words):
    tasks = [] if not flags else ["--tasks", "shardnet_facts"]
    result = _run(
        "eval",
        "--model",
        str(llama_24),
        "--initial-peers",
        "/ip4/127.0.0.1/tcp/1/p2p/x",
        "--output-path",
        str(tmp_path / "out.json"),
        *tasks,
        *flags,
    )
    assert result.returncode == 2
    _assert_one_line_error(result, *words)
