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

from shardnet.cli_flags import build_parser, initial_peers, swarm_key
from shardnet.errors import ShardnetError
from shardnet.model_folder import check_model_folder
from shardnet.process_env import apply_defaults

logger = logging.getLogger("shardnet.cli")


def cmd_dht(args: argparse.Namespace) -> int:
    from shardnet.dht import start_dht, visible_maddrs

    stop = _stop_on_signal()  # before the node starts, so a signal during start-up is not lost
    dht = start_dht(
        initial_peers(args),
        host=args.host,
        port=args.port,
        swarm_key=swarm_key(args),
        identity_path=args.identity,
    )
    try:
        for maddr in visible_maddrs(dht):
            print(maddr, flush=True)
        logger.info("DHT node running; Ctrl-C to stop")
        stop.wait()
    finally:
        dht.shutdown()  # waits until the node's process (and its p2pd) has exited
    logger.info("DHT node stopped")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from shardnet.swarm_key import SwarmKey

    SwarmKey.generate().write(args.file)
    print(f"wrote a new swarm key to {args.file}; give it to the swarm's members over a private channel")
    print(f"then start every node with --swarm-key-file {args.file}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from shardnet.server.config import ServerConfig

    check_model_folder(args.model)  # before the server's imports, which take seconds

    config = ServerConfig(
        model_path=args.model,
        blocks=args.blocks,
        num_blocks=args.num_blocks,
        initial_peers=initial_peers(args),
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
        max_cache_tokens_per_client=args.max_cache_tokens_per_client,
        max_sessions_per_client=args.max_sessions_per_client,
        max_requests_per_s=args.max_requests_per_s,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        announce_ttl_s=args.announce_ttl,
        drain_timeout_s=args.drain_timeout,
        torch_threads=args.torch_threads,
        session_idle_timeout_s=args.session_idle_timeout,
        max_chunk_tokens=args.max_chunk_tokens,
        batching=args.batching,
        prefix_cache_tokens=args.prefix_cache_tokens,
        share_prefix_cache=args.share_prefix_cache,
        adapters=tuple(args.adapters),
        swarm_key=swarm_key(args),
        tls=args.tls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        state_dir=args.state_dir,
        headroom_file=args.headroom_file,
        headroom_on=args.headroom_on,
        headroom_off=args.headroom_off,
        headroom_window_s=args.headroom_window,
        rebalance_period_s=args.rebalance_period,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    from shardnet.server.app import run_server  # after the flags are checked: a bad one fails at once

    run_server(config)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    peers = required_peers(args)
    check_model_folder(args.model)
    from shardnet.client.swarm_status import render_table, status_document
    from shardnet.client.swarm_view import SwarmView
    from shardnet.models import block_count, derive_model_id, load_config, validate_model_id

    config = load_config(args.model)
    model_id = validate_model_id(args.model_id or derive_model_id(config))
    num_blocks = block_count(config)
    with SwarmView.connect(args.model, peers, model_id=model_id, swarm_key=swarm_key(args)) as view:
        per_block = view.servers()
    architecture = str(config.model_type)
    if args.json:
        print(json.dumps(status_document(per_block, model_id, num_blocks, architecture), indent=2))
    else:
        print(render_table(per_block, model_id, num_blocks, architecture))
    return 0


def required_peers(args: argparse.Namespace) -> tuple[str, ...]:
    """--initial-peers (or $SHARDNET_INITIAL_PEERS) of a command that joins a running swarm."""
    peers = initial_peers(args)
    if not peers:
        raise_config("--initial-peers is required (or set $SHARDNET_INITIAL_PEERS)")
    return peers


def cmd_api(args: argparse.Namespace) -> int:
    peers = required_peers(args)
    check_model_folder(args.model)
    import torch

    from shardnet.gateway import GatewayServer, create_app, open_gateway

    stop = _stop_on_signal()
    model, tokenizer, name = open_gateway(
        args.model,
        peers,
        model_name=args.model_name,
        dtype=getattr(torch, args.dtype),
        swarm_key=swarm_key(args),
        verify_fraction=args.verify_fraction,
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
    if args.model is not None:
        check_model_folder(args.model)
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
    peers = required_peers(args)
    check_model_folder(args.model)
    from shardnet.chat import ChatConfig, run_chat

    config = ChatConfig(
        model_path=args.model,
        initial_peers=peers,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        max_length=args.max_length,
        dtype=args.dtype,
        swarm_key=swarm_key(args),
        verify_fraction=args.verify_fraction,
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
    kernel closes our sockets and the file descriptors of shared memory (shardnet/process_env.py).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_eval(args: argparse.Namespace) -> int:
    peers = required_peers(args)
    check_model_folder(args.model)
    from shardnet.evaluation import EvalConfig, run_eval

    config = EvalConfig(
        model_path=args.model,
        initial_peers=peers,
        tasks=tuple(args.tasks),
        output_path=args.output_path,
        include_path=args.include_path,
        limit=args.limit,
        batch_size=args.batch_size,
        dtype=args.dtype,
        swarm_key=swarm_key(args),
        verify_fraction=args.verify_fraction,
    )
    run_eval(config)
    return 0


COMMANDS = {
    "dht": cmd_dht,
    "serve": cmd_serve,
    "status": cmd_status,
    "api": cmd_api,
    "demo": cmd_demo,
    "chat": cmd_chat,
    "eval": cmd_eval,
    "keygen": cmd_keygen,
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
    apply_defaults()  # before anything loads torch or hivemind (see shardnet/process_env.py)
    args = build_parser().parse_args(argv)
    _exit_with_parent()
    _configure_logging(args)
    # transformers imports torchao (the `quant` extra, for --quant int8) whenever it is installed, and torchao
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
