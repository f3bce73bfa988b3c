"""The FastAPI app: OpenAI's ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` over a
``ShardedModel``, plus the chat and swarm pages (``pages.py``) and Prometheus' ``/metrics`` (``metrics.py``).

One function per route: validate, plan the generations, run them in a worker thread, answer with one JSON
document or with server-sent events exactly as OpenAI streams them. A streaming request waits for its
first event before it answers, so a swarm that cannot serve it gets a 503 rather than a broken stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from shardnet.gateway.activity import ChoiceReport, RecentActivity
from shardnet.gateway.api_errors import APIError, bad_request, from_exception, install_handlers
from shardnet.gateway.completions import ChoicePlan, Delta, Finish, GenerationJob, SamplingGate
from shardnet.gateway.metrics import GatewayMetrics, add_metrics
from shardnet.gateway.pages import add_pages
from shardnet.gateway.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingParams,
    Usage,
    new_id,
    now_s,
)

logger = logging.getLogger(__name__)

DEFAULT_CHAT_MAX_TOKENS = 512  # when a chat request gives no max_tokens (bounded by the context, too)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # as OpenAI's legacy completions
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class Gateway:
    """What the routes share: the model, its tokenizer, and the gateway's generation state."""

    def __init__(self, model, tokenizer, model_name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.created = now_s()
        self.gate = SamplingGate()
        self.activity = RecentActivity()
        self.metrics = GatewayMetrics(model.health)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    def choice_done(self, report: ChoiceReport) -> None:
        """A choice ended (in a job's worker thread): count it and keep it for the swarm page."""
        self.metrics.observe_choice(report)
        self.activity.record(report)

    def job(self, plan: ChoicePlan) -> GenerationJob:
        return GenerationJob(self.model, self.tokenizer, plan, self.gate, self.choice_done)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def plan(self, request: SamplingParams, prompts: list[list[int]], requested: int | None, default: int):
        self.check_model(request.model)
        unsupported = request.unsupported()
        if unsupported is not None:
            param, message = unsupported
            raise bad_request(message, param, "unsupported_parameter")
        longest = max(len(p) for p in prompts)
        if longest == 0:
            raise bad_request("the prompt is empty", "prompt", "invalid_value")
        max_new = requested or default
        if self.max_positions:
            room = int(self.max_positions) - longest
            if room < 1 or (requested is not None and requested > room):
                raise bad_request(
                    f"this model's context is {self.max_positions} tokens; the prompt has {longest} "
                    f"and max_tokens asks for {requested or max_new} more",
                    "max_tokens",
                    "context_length_exceeded",
                )
            max_new = min(max_new, room)
        return ChoicePlan(
            prompts=prompts,
            n=request.n,
            max_new_tokens=max_new,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop_strings,
            seed=request.seed,
        )

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(
                f"the model `{self.model_name}` has no chat template; use /v1/completions",
                "messages",
                "no_chat_template",
            )
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as exc:  # a template may refuse a conversation (e.g. roles out of order)
            raise bad_request(f"the chat template refused these messages: {exc}", "messages") from exc
        return [int(i) for i in encoded["input_ids"]]

    def text_prompt(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text).input_ids]


async def _first_event(job: GenerationJob) -> tuple[AsyncIterator, object | None]:
    """Start the job and wait for its first event; a generation error becomes an APIError here."""
    job.start()
    events = job.events().__aiter__()
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        return events, None
    except BaseException as exc:
        job.stop()
        raise from_exception(exc) from exc
    return events, first


@dataclass
class _Answers:
    """A non-streaming job's result: each choice's text and finish reason, and every Finish event."""

    texts: list[str]
    reasons: list[str]
    finishes: list[Finish]


async def _answers(job: GenerationJob, request: Request, choices: int) -> _Answers:
    events = await _all_events(job, request)
    texts = ["" for _ in range(choices)]
    for event in events:
        if isinstance(event, Delta):
            texts[event.index] += event.text
    finishes = [e for e in events if isinstance(e, Finish)]
    reasons = {f.index: f.reason for f in finishes}
    return _Answers(texts, [reasons.get(i, "length") for i in range(choices)], finishes)


async def _all_events(job: GenerationJob, request: Request) -> list:
    """Every event of a non-streaming job; stops the job if the client disconnects meanwhile."""

    async def collect() -> list:
        events, first = await _first_event(job)
        out = [] if first is None else [first]
        async for event in events:
            out.append(event)
        return out

    task = asyncio.ensure_future(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                job.stop()
        return task.result()
    except BaseException as exc:
        job.stop()
        if not task.done():
            task.cancel()
        raise from_exception(exc) from exc


def _sse(document) -> bytes:
    payload = document if isinstance(document, str) else json.dumps(document, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def _usage(prompt_tokens: int, finishes: list[Finish]) -> Usage:
    completion = sum(f.completion_tokens for f in finishes)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
    )


async def _stream(job: GenerationJob, events, first, make_chunk, usage_chunk) -> AsyncIterator[bytes]:
    """SSE bytes for every event, then the usage chunk if asked, then [DONE]. The job stops if the
    response is cancelled (the client disconnected) or fails midway."""
    finishes: list[Finish] = []
    try:
        pending = [] if first is None else [first]
        for event in pending:
            if isinstance(event, Finish):
                finishes.append(event)
            yield _sse(make_chunk(event))
        try:
            async for event in events:
                if isinstance(event, Finish):
                    finishes.append(event)
                yield _sse(make_chunk(event))
        except Exception as exc:  # headers are sent: report it in the stream, as OpenAI does
            error = from_exception(exc)
            yield _sse({"error": error.detail.model_dump()})
            return
        extra = usage_chunk(finishes)
        if extra is not None:
            yield _sse(extra)
        yield _sse("[DONE]")
    finally:
        job.stop()


def create_app(model, tokenizer, model_name: str) -> FastAPI:
    """The gateway app over a loaded ``ShardedModel`` and its tokenizer, serving ``model_name``."""
    gateway = Gateway(model, tokenizer, model_name)
    app = FastAPI(title="shardnet", docs_url="/docs", redoc_url=None)
    app.state.gateway = gateway
    install_handlers(app)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=gateway.created)])

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> ModelCard:
        gateway.check_model(name)
        return ModelCard(id=model_name, created=gateway.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        gateway.check_model(body.model)
        prompt = gateway.chat_prompt(body)
        requested = body.max_completion_tokens or body.max_tokens
        plan = gateway.plan(body, [prompt], requested, DEFAULT_CHAT_MAX_TOKENS)
        job = gateway.job(plan)
        rid, created = new_id("chatcmpl"), now_s()
        if not body.stream:
            answers = await _answers(job, request, body.n)
            return ChatCompletion(
                id=rid,
                created=created,
                model=model_name,
                choices=[
                    ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=reason)
                    for i, (text, reason) in enumerate(zip(answers.texts, answers.reasons, strict=True))
                ],
                usage=_usage(len(prompt), answers.finishes),
            )

        events, first = await _first_event(job)
        started: set[int] = set()

        def chunk(event) -> dict:
            delta = ChatDelta()
            if event.index not in started:  # the first chunk of a choice carries the role, as OpenAI's
                started.add(event.index)
                delta.role = "assistant"
            if isinstance(event, Delta):
                delta.content = event.text
                choice = ChatChunkChoice(index=event.index, delta=delta)
            else:
                choice = ChatChunkChoice(index=event.index, delta=delta, finish_reason=event.reason)
            out = ChatCompletionChunk(id=rid, created=created, model=model_name, choices=[choice])
            return out.model_dump(exclude={"usage"})

        def usage_chunk(finishes: list[Finish]) -> dict | None:
            if not body.include_usage:
                return None
            usage = _usage(len(prompt), finishes)
            return ChatCompletionChunk(
                id=rid, created=created, model=model_name, choices=[], usage=usage
            ).model_dump()

        return StreamingResponse(
            _stream(job, events, first, chunk, usage_chunk), media_type="text/event-stream"
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        gateway.check_model(body.model)
        prompts = [gateway.text_prompt(text) for text in body.prompts]
        plan = gateway.plan(body, prompts, body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS)
        job = gateway.job(plan)
        rid, created = new_id("cmpl"), now_s()
        prompt_tokens = sum(len(p) for p in prompts)  # counted once per prompt, whatever n
        total = len(prompts) * body.n
        if not body.stream:
            answers = await _answers(job, request, total)
            return Completion(
                id=rid,
                created=created,
                model=model_name,
                choices=[
                    CompletionChoice(index=i, text=text, finish_reason=reason)
                    for i, (text, reason) in enumerate(zip(answers.texts, answers.reasons, strict=True))
                ],
                usage=_usage(prompt_tokens, answers.finishes),
            )

        events, first = await _first_event(job)

        def chunk(event) -> dict:
            text = event.text if isinstance(event, Delta) else ""
            reason = event.reason if isinstance(event, Finish) else None
            choice = CompletionChoice(index=event.index, text=text, finish_reason=reason)
            return Completion(id=rid, created=created, model=model_name, choices=[choice]).model_dump(
                exclude={"usage"}
            )

        def usage_chunk(finishes: list[Finish]) -> dict | None:
            if not body.include_usage:
                return None
            usage = _usage(prompt_tokens, finishes)
            return Completion(id=rid, created=created, model=model_name, choices=[], usage=usage).model_dump()

        return StreamingResponse(
            _stream(job, events, first, chunk, usage_chunk), media_type="text/event-stream"
        )

    add_pages(app, gateway)
    add_metrics(app, gateway.metrics)

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    return app
