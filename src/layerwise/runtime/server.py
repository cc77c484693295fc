"""``layerwise serve``: a local HTTP server (FastAPI) where the controller picks a profile per request.

- ``POST /generate`` {prompt, max_new_tokens, max_latency_ms | min_tokens_per_s} → the continuation, the chosen
  profile, timings and whether the latency objective was met;
- ``POST /v1/completions`` and ``POST /v1/chat/completions``: the OpenAI conventions that llama.cpp's server,
  vLLM and Ollama speak (greedy decoding; ``stream`` as server-sent events; the chat template is the
  tokenizer's), with the objective as an extra field (``extra_body={"max_latency_ms": 800}`` in the client);
- ``GET /v1/models``; ``GET /metrics`` → requests per profile, objective attainment and the chosen profiles
  per load level, decision overhead.

An objective counts from the request's arrival (queueing spends it too; the controller sees what is left).
One that even the fastest profile is predicted to miss under the current load, without any queue, is refused
with 422 before any work is done. Requests run one at a time (one model); whatever happens, the model is back in its
dense state when a request ends.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from ..errors import LayerwiseError
from .controller import Controller
from .prompts import Prompt
from .session import RuntimeEnvironment, Serving

MAX_NEW_TOKENS = 512
MAX_WAITING = 8  # requests queued behind the one running; more are refused with 503 rather than piling up
LOAD_LEVELS = ((0.15, "idle"), (0.6, "busy"), (float("inf"), "saturated"))  # other processes' CPU share


def load_level(state: list[float]) -> str:
    """The load level of a state, from its first feature (other processes' CPU share)."""
    return next(name for bound, name in LOAD_LEVELS if state[0] < bound)


class Objective(BaseModel):
    """A per-request latency objective: a deadline, or a rate over the requested tokens."""

    max_latency_ms: float | None = Field(None, gt=0, description="finish within this many ms")
    min_tokens_per_s: float | None = Field(None, gt=0, description="or: at least this many new tokens per second")

    def objective_ms(self, new_tokens: int, default: float | None) -> float | None:
        if self.max_latency_ms is not None:
            return self.max_latency_ms
        if self.min_tokens_per_s is not None:
            return 1000.0 * new_tokens / self.min_tokens_per_s
        return default


class GenerateRequest(Objective):
    prompt: str = Field(min_length=1, description="the prompt text")
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)


class GenerateResponse(BaseModel):
    text: str
    profile: str
    new_tokens: int
    tokens_per_s: float
    prefill_ms: float
    decode_ms: float
    decide_ms: float
    switch_ms: float
    latency_ms: float
    queue_ms: float
    objective_ms: float | None
    met: bool | None


class CompletionRequest(Objective):
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    stream: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(Objective):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stream: bool = False


@dataclass(frozen=True)
class Admission:
    """A request that passed the checks: its text, the ids served, its whole length in tokens, how many new
    tokens it asks for, its objective and when it arrived (``time.perf_counter``)."""

    text: str
    ids: Any
    prompt_tokens: int
    new_tokens: int
    objective_ms: float | None
    arrived: float


@dataclass
class Served:
    """One request in flight: what was decided, and (once done) what it measured."""

    profile: str
    state: list[float]
    decide_ms: float
    objective_ms: float | None
    prompt_tokens: int
    queue_ms: float = 0.0  # waited for the model before this request was decided
    switch_ms: float = 0.0
    tokens: list[int] = field(default_factory=list)
    latency_ms: float = 0.0  # prefill + decode
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    finished: bool = False  # the last token was end-of-sequence

    @property
    def met(self) -> bool | None:
        """The objective counts from the request's arrival: time in the queue spends it too."""
        return None if self.objective_ms is None else self.queue_ms + self.latency_ms <= self.objective_ms


class Metrics:
    """Counters behind ``GET /metrics``."""

    def __init__(self) -> None:
        self.requests = self.errors = self.rejected = 0
        self.profiles: dict[str, int] = {}
        self.tokens_per_s: list[float] = []
        self.decide_ms: list[float] = []
        self.queue_ms: list[float] = []
        self.by_load: dict[str, dict[str, Any]] = {}

    def record(self, served: Served) -> None:
        self.requests += 1
        self.profiles[served.profile] = self.profiles.get(served.profile, 0) + 1
        self.tokens_per_s.append(len(served.tokens) / max(served.latency_ms / 1000, 1e-9))
        self.decide_ms.append(served.decide_ms)
        self.queue_ms.append(served.queue_ms)
        level = self.by_load.setdefault(load_level(served.state),
                                        {"requests": 0, "with_objective": 0, "met": 0, "profiles": {}})
        level["requests"] += 1
        level["profiles"][served.profile] = level["profiles"].get(served.profile, 0) + 1
        if served.met is not None:
            level["with_objective"] += 1
            level["met"] += int(served.met)

    def report(self) -> dict[str, Any]:
        mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
        judged = sum(level["with_objective"] for level in self.by_load.values())
        met = sum(level["met"] for level in self.by_load.values())
        by_load = {name: {**level, "attainment": level["met"] / level["with_objective"] if level["with_objective"]
                          else None} for name, level in self.by_load.items()}
        return {"requests": self.requests, "errors": self.errors, "rejected_objectives": self.rejected,
                "profiles": self.profiles, "mean_tokens_per_s": mean(self.tokens_per_s),
                "mean_decide_ms": mean(self.decide_ms), "mean_queue_ms": mean(self.queue_ms),
                "objectives": {"requests": judged, "met": met, "attainment": met / judged if judged else None},
                "by_load": by_load}


def create_app(env: RuntimeEnvironment, controller: Controller | None, default_objective_ms: float | None = None,
               model_name: str | None = None) -> Any:
    """The FastAPI app over ``env``; without a controller every request is served dense. Requests that state no
    objective get ``default_objective_ms`` (None: none)."""

    if controller is not None and controller.actions != env.profiles.names:
        raise LayerwiseError("The checkpoint's profiles differ from this model's profiles.")
    app = FastAPI(title="layerwise runtime server")

    @app.exception_handler(HTTPException)
    def http_error(request: Any, exc: HTTPException) -> JSONResponse:
        """FastAPI's ``detail`` and the OpenAI ``error`` object, so that both kinds of client read the reason."""
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(status_code=exc.status_code, headers=exc.headers, content={
            "detail": exc.detail, "error": {"message": exc.detail, "type": kind, "code": exc.status_code}})

    lock = threading.Lock()
    queue = {"waiting": 0}
    queue_lock = threading.Lock()
    metrics = Metrics()
    tokenizer = env.loaded.tokenizer
    name = model_name or env.loaded.spec

    def admit(text: str, new_tokens: int, objective: Objective) -> Admission:
        """The request tokenized once, with its objective in ms; 422 when it cannot be served, 503 when the queue
        is full."""
        ids, prompt_tokens = env.tokenize(Prompt("request", text))
        if env.context is not None and prompt_tokens + new_tokens > env.context:
            raise HTTPException(status_code=422, detail=f"The prompt has {prompt_tokens} tokens; with "
                                f"{new_tokens} new tokens it exceeds the model's context of {env.context}.")
        objective_ms = objective.objective_ms(new_tokens, default_objective_ms)
        if objective_ms is not None:
            fastest, predicted = env.speeds.fastest(ids.shape[1], new_tokens)
            if predicted > objective_ms:
                metrics.rejected += 1
                raise HTTPException(status_code=422, detail=f"The latency objective of {objective_ms:.0f} ms cannot "
                                    f"be met: the fastest profile ({fastest}) needs about {predicted:.0f} ms for "
                                    f"{ids.shape[1]} prompt tokens and {new_tokens} new tokens at the current load.")
        with queue_lock:
            if queue["waiting"] >= MAX_WAITING:
                raise HTTPException(status_code=503, detail="The server is busy; retry shortly.")
            queue["waiting"] += 1
        return Admission(text, ids, prompt_tokens, new_tokens, objective_ms, time.perf_counter())

    def decode(request: Admission, served: list[Served]) -> Iterator[int]:
        """Decide, switch, decode (yielding each token), switch back and count; holds the model throughout.
        The controller sees what is left of the objective after the queue. ``served`` receives the request's
        record as soon as the profile is chosen."""
        objective_ms = request.objective_ms
        with lock:
            try:
                start = time.perf_counter()
                waited = 1000 * (start - request.arrived)
                left = None if objective_ms is None else max(1.0, objective_ms - waited)
                state = env.observe(Prompt("request", request.text), left, request.new_tokens, request.prompt_tokens)
                profile = env.profiles.names[controller.act(state, explore=False)] if controller else "none"
                record = Served(profile, state, 1000 * (time.perf_counter() - start), objective_ms,
                                request.prompt_tokens, waited)
                served.append(record)
                serving = Serving(env, profile, request.ids, request.new_tokens, eos_token_id=tokenizer.eos_token_id)
                tokens = iter(serving)
                try:
                    for token in tokens:
                        record.tokens.append(token)
                        yield token
                finally:
                    tokens.close()  # a client gone mid-stream: back to dense now, not when collected
                result = serving.generation
                record.switch_ms = serving.switch_ms
                record.prefill_ms, record.decode_ms = 1000 * result.prefill_s, 1000 * result.decode_s
                record.latency_ms = result.latency_ms
                record.finished = bool(record.tokens) and record.tokens[-1] == tokenizer.eos_token_id
            except Exception:
                metrics.errors += 1
                raise
            finally:
                with queue_lock:
                    queue["waiting"] -= 1
            metrics.record(record)

    def run(text: str, new_tokens: int, objective: Objective) -> Served:
        admitted = admit(text, new_tokens, objective)
        served: list[Served] = []
        try:
            for _ in decode(admitted, served):
                pass
        except Exception as exc:
            raise HTTPException(status_code=500, detail=f"generation failed: {exc}") from exc
        return served[0]

    def text_of(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    def layerwise_fields(served: Served) -> dict[str, Any]:
        return {"profile": served.profile, "latency_ms": served.latency_ms, "queue_ms": served.queue_ms,
                "objective_ms": served.objective_ms, "met": served.met, "decide_ms": served.decide_ms,
                "switch_ms": served.switch_ms}

    def usage(served: Served) -> dict[str, int]:
        return {"prompt_tokens": served.prompt_tokens, "completion_tokens": len(served.tokens),
                "total_tokens": served.prompt_tokens + len(served.tokens)}

    def events(text: str, new_tokens: int, objective: Objective, chunk: Any) -> StreamingResponse:
        """Server-sent events: ``chunk(piece, finish_reason)`` per piece of text, then ``[DONE]``."""
        admitted = admit(text, new_tokens, objective)
        served: list[Served] = []

        def body() -> Iterator[str]:
            sent, tokens = "", []
            try:
                for token in decode(admitted, served):
                    tokens.append(token)
                    decoded = text_of(tokens)
                    if decoded.startswith(sent) and not decoded.endswith("\ufffd") and len(decoded) > len(sent):
                        yield f"data: {json.dumps(chunk(decoded[len(sent):], None))}\n\n"
                        sent = decoded
            except Exception as exc:  # the status line is gone: say it in the stream, as OpenAI does
                yield f"data: {json.dumps({'error': {'message': f'generation failed: {exc}'}})}\n\n"
                return
            final = chunk("", "stop" if served[0].finished else "length")
            final["layerwise"] = layerwise_fields(served[0])
            yield f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.post("/generate", response_model=GenerateResponse)
    def generate_endpoint(request: GenerateRequest) -> GenerateResponse:
        served = run(request.prompt, request.max_new_tokens, request)
        return GenerateResponse(text=text_of(served.tokens), profile=served.profile, new_tokens=len(served.tokens),
                                tokens_per_s=len(served.tokens) / max(served.latency_ms / 1000, 1e-9),
                                prefill_ms=served.prefill_ms, decode_ms=served.decode_ms,
                                decide_ms=served.decide_ms, switch_ms=served.switch_ms,
                                latency_ms=served.latency_ms, queue_ms=served.queue_ms,
                                objective_ms=served.objective_ms, met=served.met)

    @app.post("/v1/completions")
    def completions(request: CompletionRequest) -> Any:
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise HTTPException(status_code=422, detail="This server takes one non-empty prompt per request.")
        identity = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": name}
        if request.stream:
            return events(prompts[0], request.max_tokens, request, lambda piece, reason: {
                **identity, "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}]})
        served = run(prompts[0], request.max_tokens, request)
        return {**identity, "choices": [{"index": 0, "text": text_of(served.tokens), "logprobs": None,
                                         "finish_reason": "stop" if served.finished else "length"}],
                "usage": usage(served), "layerwise": layerwise_fields(served)}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest) -> Any:
        if not getattr(tokenizer, "chat_template", None):
            raise HTTPException(status_code=400, detail=f"{name} has no chat template; use /v1/completions.")
        text = tokenizer.apply_chat_template([m.model_dump() for m in request.messages], tokenize=False,
                                             add_generation_prompt=True)
        new_tokens = request.max_completion_tokens or request.max_tokens or 16
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if request.stream:
            first = {"started": False}

            def chunk(piece: str, reason: str | None) -> dict[str, Any]:
                delta: dict[str, str] = {"content": piece} if piece or reason is None else {}
                if not first["started"]:
                    delta, first["started"] = {"role": "assistant", **delta}, True
                return {**identity, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

            return events(text, new_tokens, request, chunk)
        served = run(text, new_tokens, request)
        return {**identity, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text_of(served.tokens)},
                             "finish_reason": "stop" if served.finished else "length"}],
                "usage": usage(served), "layerwise": layerwise_fields(served)}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "layerwise"}]}

    @app.get("/metrics")
    def metrics_endpoint() -> dict[str, Any]:
        return {**metrics.report(), "active_profile": env.profiles.active.name,
                "available_profiles": env.profiles.names, "controller": controller is not None,
                "slowdown": {"prefill": env.speeds.prefill_slowdown, "decode": env.speeds.decode_slowdown},
                "profile_factors": {name: env.speeds.factor(name) for name in env.speeds.lines}}

    return app
