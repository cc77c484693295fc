"""``layerwise serve``: a local HTTP server (FastAPI) where the controller picks a profile per request.

``POST /generate`` {prompt, max_new_tokens} → the continuation, the chosen profile and timings;
``GET /metrics`` → request counts per profile, mean tokens/s and decision overhead. Requests run one at a
time (one model); whatever happens, the model is back in its dense state when a request ends.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pydantic import BaseModel, Field

from ..errors import LayerwiseError
from .controller import Controller
from .generate import generate
from .prompts import Prompt
from .session import RuntimeEnvironment

MAX_NEW_TOKENS = 512
MAX_WAITING = 8  # requests queued behind the one running; more are refused with 503 rather than piling up


class GenerateRequest(BaseModel):
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


def create_app(env: RuntimeEnvironment, controller: Controller | None) -> Any:
    """The FastAPI app over ``env``; without a controller every request is served dense."""
    from fastapi import FastAPI, HTTPException

    app = FastAPI(title="layerwise runtime server")
    lock = threading.Lock()
    queue = {"waiting": 0}
    queue_lock = threading.Lock()
    context = getattr(env.loaded.model.config, "max_position_embeddings", None)
    metrics: dict[str, Any] = {"requests": 0, "errors": 0, "profiles": {}, "tokens_per_s": [], "decide_ms": []}
    if controller is not None and controller.actions != env.profiles.names:
        raise LayerwiseError("The checkpoint's profiles differ from this model's profiles.")

    @app.post("/generate", response_model=GenerateResponse)
    def generate_endpoint(request: GenerateRequest) -> GenerateResponse:
        prompt_tokens = len(env.loaded.tokenizer(request.prompt)["input_ids"])
        if context is not None and prompt_tokens + request.max_new_tokens > context:
            raise HTTPException(status_code=422, detail=f"The prompt has {prompt_tokens} tokens; with "
                                f"max_new_tokens {request.max_new_tokens} it exceeds the model's context of {context}.")
        with queue_lock:
            if queue["waiting"] >= MAX_WAITING:
                raise HTTPException(status_code=503, detail="The server is busy; retry shortly.")
            queue["waiting"] += 1
        try:
            return _serve(request)
        finally:
            with queue_lock:
                queue["waiting"] -= 1

    def _serve(request: GenerateRequest) -> GenerateResponse:
        with lock:
            try:
                start = time.perf_counter()
                state = env.observe(Prompt("request", request.prompt))
                profile = env.profiles.names[controller.act(state, explore=False)] if controller else "none"
                decide_ms = 1000 * (time.perf_counter() - start)
                ids = env.ids(Prompt("request", request.prompt))
                start = time.perf_counter()
                env.profiles.activate(profile)
                switch_ms = 1000 * (time.perf_counter() - start)
                result = generate(env.loaded.model, ids, request.max_new_tokens, env.profiles.kv_eviction(),
                                  eos_token_id=env.loaded.tokenizer.eos_token_id)
            except Exception as exc:
                metrics["errors"] += 1
                raise HTTPException(status_code=500, detail=f"generation failed: {exc}") from exc
            finally:
                env.profiles.restore()
            metrics["requests"] += 1
            metrics["profiles"][profile] = metrics["profiles"].get(profile, 0) + 1
            metrics["tokens_per_s"].append(result.tokens_per_s)
            metrics["decide_ms"].append(decide_ms)
            return GenerateResponse(text=env.loaded.tokenizer.decode(result.new_tokens), profile=profile,
                                    new_tokens=len(result.new_tokens), tokens_per_s=result.tokens_per_s,
                                    prefill_ms=1000 * result.prefill_s, decode_ms=1000 * result.decode_s,
                                    decide_ms=decide_ms, switch_ms=switch_ms)

    @app.get("/metrics")
    def metrics_endpoint() -> dict[str, Any]:
        mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
        return {"requests": metrics["requests"], "errors": metrics["errors"], "profiles": metrics["profiles"],
                "mean_tokens_per_s": mean(metrics["tokens_per_s"]), "mean_decide_ms": mean(metrics["decide_ms"]),
                "active_profile": env.profiles.active.name, "available_profiles": env.profiles.names,
                "controller": controller is not None}

    return app
