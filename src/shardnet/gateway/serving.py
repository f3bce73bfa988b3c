"""Running the gateway: load the model and tokenizer from a folder, serve the app with uvicorn in a thread
of this process, learn the port it bound (port 0 picks one), stop it."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import uvicorn

from shardnet.client.model import ShardedModel
from shardnet.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)


class GatewayStartError(ConfigError):
    """The HTTP server could not start (e.g. the port is taken)."""


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"--model {path}: the gateway needs a tokenizer in the folder ({exc})") from exc


def open_gateway(
    model_path: str | Path, initial_peers, model_name: str | None = None, **model_kwargs
) -> tuple[ShardedModel, object, str]:
    """(model, tokenizer, served name) for a model folder; the name defaults to the folder's name."""
    path = Path(model_path)
    if not path.is_dir():
        raise ConfigError(f"--model {path}: no such model folder")
    tokenizer = load_tokenizer(path)
    model = ShardedModel.from_pretrained(path, initial_peers=list(initial_peers), **model_kwargs)
    return model, tokenizer, model_name or path.resolve().name


class GatewayServer:
    """uvicorn serving an app in a background thread; ``start()`` returns once it listens."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.host = host
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # older uvicorn; the caller owns signals
        self.thread = threading.Thread(target=self._run, name="shardnet-gateway-http", daemon=True)
        self.port: int | None = None

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits this way when it cannot bind; it has logged why
            logger.debug("the gateway's HTTP server exited", exc_info=True)
        except BaseException:
            logger.exception("the gateway's HTTP server failed")

    def start(self, timeout_s: float = 30.0) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise GatewayStartError(
                    f"the gateway could not listen on {self.host}:{self.server.config.port}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise GatewayStartError(f"the gateway did not start in {timeout_s} s")
            time.sleep(0.02)
        sockets = [s for server in self.server.servers for s in server.sockets]
        self.port = int(sockets[0].getsockname()[1])
        logger.info("gateway listening on %s", self.url)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout_s)

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
