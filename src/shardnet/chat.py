"""``shardnet chat``: a multi-turn chat in the terminal, over one inference session per conversation.

Each turn sends the servers only the new tokens: the tokenizer's chat template applied to the whole
conversation so far, minus every token the session has already seen (the earlier prompts and answers,
including the last answer token, which generate() leaves pending in the session). ``/reset`` closes
the session and starts a new conversation; ``/quit``, end of input (Ctrl-D) and Ctrl-C end the chat.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from transformers import AutoTokenizer

from shardnet.client.model import ShardedModel
from shardnet.errors import ConfigError, ModelLoadError
from shardnet.models import load_config
from shardnet.swarm_key import SwarmKey
from shardnet.terminal import AnswerStreamer, record_sigint, restore_sigint, say, sigint_ignored

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
RESET, QUIT = "/reset", "/quit"
_SENTINEL = "\x00shardnet-answer\x00"  # stands for the last answer when the template is split around it


@dataclass(frozen=True)
class ChatConfig:
    model_path: Path  # model folder with a tokenizer that has a chat template
    initial_peers: tuple[str, ...]  # multiaddrs of DHT peers of the swarm serving the model
    max_new_tokens: int = 256  # longest answer; it also ends at the model's end-of-turn token
    temperature: float = 0.7  # 0 = greedy (the same answer every time); else sampling at this temperature
    top_p: float = 0.9  # nucleus sampling, when sampling
    max_length: int = 2048  # positions one conversation may hold on the servers, prompts and answers together
    dtype: str = "float32"  # dtype of the client's parts and of the servers used
    swarm_key: SwarmKey | None = None  # the key of a private swarm (--swarm-key-file)
    verify_fraction: float = 0.05  # probability that a hop's step is checked by other holders

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise ConfigError("--initial-peers is required (or set $SHARDNET_INITIAL_PEERS)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature {self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.max_length < 2:
            raise ConfigError(f"--max-length {self.max_length}: must be at least 2")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")

    def sampling(self) -> dict:
        """generate() kwargs for the answer's decoding."""
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


class ChatHistory:
    """The messages of one conversation and every token id its inference session has seen."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.messages: list[dict[str, str]] = []
        # ids the session holds: prompts and answers, the last answer token included
        self.seen: list[int] = []

    def new_ids(self, user_text: str) -> list[int]:
        """The tokens to send for a new user message: the templated conversation minus those already seen."""
        messages = [*self.messages, {"role": "user", "content": user_text}]
        full = self._template_ids(messages)
        if full[: len(self.seen)] == self.seen:
            return full[len(self.seen) :]
        # Re-tokenizing the last answer's text gave other ids than the ones generated (or the template
        # rewrites an answer). The session keeps what was generated; send what the template puts after it.
        logger.debug("chat template does not extend the session's tokens; splitting it at the last answer")
        return self._ids_after_last_answer(messages)

    def record(self, user_text: str, sent: list[int], generated: list[int]) -> str:
        """Remember a finished turn; returns the answer's text."""
        answer = self.tokenizer.decode(generated, skip_special_tokens=True)
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        self.seen += sent + generated
        return answer

    def _template_ids(self, messages: list[dict[str, str]]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(encoded["input_ids"])

    def _ids_after_last_answer(self, messages: list[dict[str, str]]) -> list[int]:
        marked = [*messages[:-2], {"role": "assistant", "content": _SENTINEL}, messages[-1]]
        text = self.tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
        tail = self.tokenizer(text.split(_SENTINEL)[-1], add_special_tokens=False).input_ids
        if tail and self.seen and tail[0] == self.seen[-1]:  # the answer ended with the end-of-turn token
            tail = tail[1:]
        return list(tail)


def run_chat(config: ChatConfig, read_line: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Chat until /quit or end of input (0) or Ctrl-C (130). The session and the model are always closed."""
    interrupted = threading.Event()
    previous = record_sigint(interrupted)
    model: ShardedModel | None = None
    try:
        num_blocks = int(load_config(config.model_path).num_hidden_layers)  # ModelLoadError if not a model
        tokenizer = _load_tokenizer(config.model_path)
        model = ShardedModel.from_pretrained(
            config.model_path,
            initial_peers=config.initial_peers,
            dtype=getattr(torch, config.dtype),
            swarm_key=config.swarm_key,
            verify_fraction=config.verify_fraction,
        )
        route = model.route()  # no route: RouteNotFoundError now, not after the first message
        hops = ", ".join(f"{hop.start}:{hop.end} on {hop.server.short_id}" for hop in route)
        say(out, f"model: {config.model_path} ({num_blocks} blocks: {hops})")
        say(out, f"type a message; {RESET} starts a new conversation, {QUIT} or Ctrl-D ends the chat")
        prompt = "you> " if sys.stdin is not None and sys.stdin.isatty() else ""
        while _converse(model, tokenizer, config, read_line, prompt, out, interrupted):
            say(out, "(new conversation)")
        return 0
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        return 130
    finally:
        with sigint_ignored():  # a second Ctrl-C must not leave the session open on the servers
            if model is not None:
                model.close()
        restore_sigint(previous)


def _converse(model, tokenizer, config: ChatConfig, read_line, prompt: str, out: TextIO, interrupted) -> bool:
    """One conversation in one inference session; True when the user asked for a new one."""
    history = ChatHistory(tokenizer)
    with model.inference_session(max_length=config.max_length):
        while True:
            try:
                text = read_line(prompt).strip()
            except EOFError:
                if prompt:
                    out.write("\n")
                return False
            if text == QUIT:
                return False
            if text == RESET:
                return True
            if not text:
                continue
            new_ids = history.new_ids(text)
            room = config.max_length - len(history.seen) - len(new_ids)
            if room < 1:
                say(
                    out,
                    f"(this message does not fit: the conversation holds {len(history.seen)} of "
                    f"{config.max_length} positions (--max-length) and the message needs {len(new_ids)}; "
                    f"type {RESET} to start a new conversation)",
                )
                continue
            max_new_tokens = min(config.max_new_tokens, room)
            streamer = AnswerStreamer(tokenizer, out, interrupted)
            ids = torch.tensor([new_ids], dtype=torch.long)  # [1, new]
            output = model.generate(
                ids, max_new_tokens=max_new_tokens, streamer=streamer, **config.sampling()
            )
            generated = output[0, len(new_ids) :].tolist()
            history.record(text, new_ids, generated)
            if len(history.seen) >= config.max_length:
                say(out, f"(the conversation is full at --max-length {config.max_length}; type {RESET})")


def _load_tokenizer(path: Path):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"--model {path}: chat needs a tokenizer in the folder ({exc})") from exc
    if not tokenizer.chat_template:
        raise ModelLoadError(f"--model {path}: the tokenizer has no chat template, so it cannot chat")
    return tokenizer
