"""Training and testing the runtime controller: requests served under machine load, one profile per
request, rewarded by speed and quality.

Each request: read the state (telemetry + prompt features), let the controller (or a fixed policy) pick a
profile, switch to it, decode ``max_new_tokens`` teacher-forced on the dense model's own greedy continuation
of the prompt (cached per prompt), switch back. Speed is that decode's tokens/s (prefill included); quality is
the served model's perplexity of that continuation, so a profile that degrades the model pays even when its
own output would be fluent repetition. Reward: ``0.6 · tokens/s / tps_scale − 0.4 · PPL / ppl_scale``, by
default the seed's ``0.6·tokens/s − 0.4·PPL/10`` (``tps_scale`` 1). ``tps_scale`` 0 means "the dense model's
idle tokens/s, measured first": both terms are then of order one and quality weighs about 25 times more on
smollm2-135m, where no profile beats the dense model on average.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..errors import LayerwiseError
from ..models import LoadedModel
from .controller import Controller, DqnSettings, Head, Transition
from .features import PROMPT_FEATURES, PromptFeaturizer
from .generate import Generation, generate
from .load import LoadCondition, MachineLoad
from .profiles import Importance, ProfileSet
from .prompts import Prompt
from .telemetry import TELEMETRY_FEATURES, Telemetry

MAX_PROMPT_TOKENS = 512


@dataclass
class RewardSettings:
    tps_weight: float = 0.6
    ppl_weight: float = 0.4
    tps_scale: float = 1.0  # 0: the dense model's idle tokens/s (measured by calibrate_speed)
    ppl_scale: float = 10.0

    def terms(self, tokens_per_s: float, ppl: float) -> list[float]:
        """The reward's speed and quality terms (in that order); the reward is their sum."""
        return [self.tps_weight * tokens_per_s / (self.tps_scale or 1.0), -self.ppl_weight * ppl / self.ppl_scale]

    def reward(self, tokens_per_s: float, ppl: float) -> float:
        return sum(self.terms(tokens_per_s, ppl))


@dataclass
class RequestRecord:
    """One served request: where, what was chosen, what it cost and earned."""

    condition: str
    source: str
    policy: str
    profile: str
    tokens_per_s: float
    ppl: float
    reward: float
    switch_ms: float
    decide_ms: float
    decode_ms: float
    epsilon: float | None = None


class RuntimeEnvironment:
    """The model with its profiles, the observation, and a cache of reference continuations."""

    def __init__(self, loaded: LoadedModel, calibration: Any, max_new_tokens: int, mechanism: str = "sliced",
                 importance: str = "act") -> None:
        """``importance``: a width scorer of the Profile (``act`` magnitude, ``taylor``), computed once."""
        self.loaded = loaded
        self.max_new_tokens = max_new_tokens
        self.profiles = ProfileSet(loaded.model, Importance.from_calibration(loaded.model, calibration, importance),
                                   mechanism=mechanism)
        self.featurizer = PromptFeaturizer(loaded.tokenizer)
        self.telemetry = Telemetry()
        self.references: dict[str, list[int]] = {}

    @property
    def state_size(self) -> int:
        return len(TELEMETRY_FEATURES) + len(PROMPT_FEATURES)

    def reward_heads(self, decompose: bool = True) -> dict[str, Head]:
        """The controller's heads. Speed sees the telemetry and the prompt's length, factored (see ``Head``);
        quality sees the prompt's features only, since a profile's perplexity on a prompt does not depend on
        the machine's load. Not decomposed: one head learns the whole reward from the whole state."""
        if not decompose:
            return {"reward": Head()}
        telemetry, length = len(TELEMETRY_FEATURES), len(TELEMETRY_FEATURES) + PROMPT_FEATURES.index("length")
        return {"speed": Head((*range(telemetry), length), factored=True),
                "quality": Head(tuple(range(telemetry, self.state_size)))}

    def observe(self, prompt: Prompt) -> list[float]:
        return self.telemetry.vector() + self.featurizer(prompt.text)

    def ids(self, prompt: Prompt) -> torch.Tensor:
        ids = self.loaded.tokenizer(prompt.text, return_tensors="pt")["input_ids"]
        return ids[:, -MAX_PROMPT_TOKENS:]

    def reference(self, prompt: Prompt) -> list[int]:
        """The dense model's greedy continuation of ``prompt`` (computed once)."""
        if prompt.text not in self.references:
            self.profiles.restore()
            self.references[prompt.text] = generate(self.loaded.model, self.ids(prompt), self.max_new_tokens).new_tokens
        return self.references[prompt.text]

    def serve(self, prompt: Prompt, profile: str) -> tuple[Generation, float]:
        """Decode under ``profile`` teacher-forced on the reference; (generation, switching time in ms: into the
        profile and back to dense)."""
        forced = self.reference(prompt)
        start = time.perf_counter()
        self.profiles.activate(profile)
        switch_ms = 1000 * (time.perf_counter() - start)
        try:
            generation = generate(self.loaded.model, self.ids(prompt), self.max_new_tokens,
                                  self.profiles.kv_eviction(), forced=forced)
        finally:
            start = time.perf_counter()
            self.profiles.restore()
            switch_ms += 1000 * (time.perf_counter() - start)
        return generation, switch_ms


Policy = Callable[[list[float]], int]


def run_request(env: RuntimeEnvironment, prompt: Prompt, state: list[float], decide: Policy, policy: str,
                condition: str, reward: RewardSettings, observe_ms: float) -> tuple[int, RequestRecord]:
    """Pick a profile for ``state`` and serve ``prompt`` with it."""
    start = time.perf_counter()
    action = decide(state)
    decide_ms = observe_ms + 1000 * (time.perf_counter() - start)
    profile = env.profiles.names[action]
    generation, switch_ms = env.serve(prompt, profile)
    earned = reward.reward(generation.tokens_per_s, generation.perplexity)
    return action, RequestRecord(condition, prompt.source, policy, profile, generation.tokens_per_s,
                                 generation.perplexity, earned, switch_ms, decide_ms,
                                 1000 * (generation.prefill_s + generation.decode_s))


def timed_observe(env: RuntimeEnvironment, prompt: Prompt) -> tuple[list[float], float]:
    start = time.perf_counter()
    state = env.observe(prompt)
    return state, 1000 * (time.perf_counter() - start)


def settle(env: RuntimeEnvironment, seconds: float) -> None:
    """Give a freshly started load time to show, and start the telemetry's CPU window inside it."""
    time.sleep(seconds)
    env.telemetry.external_cpu()


def calibrate_speed(env: RuntimeEnvironment, prompts: list[Prompt], reward: RewardSettings) -> None:
    """Set ``tps_scale`` to the dense model's idle tokens/s on a few prompts when it is 0."""
    if not reward.tps_scale:
        speeds = [env.serve(p, "none")[0].tokens_per_s for p in prompts[:3]]
        reward.tps_scale = sorted(speeds)[len(speeds) // 2]


@dataclass
class TrainSettings:
    episodes: int = 50
    steps_per_episode: int = 10
    conditions: list[LoadCondition] = field(default_factory=list)
    settle_s: float = 1.0  # wait after starting a load so the telemetry sees it
    reward_heads: bool = True  # learn speed and quality by separate heads (see RuntimeEnvironment.reward_heads)


def train(env: RuntimeEnvironment, prompts: list[Prompt], settings: TrainSettings, reward: RewardSettings,
          checkpoint: Path, dqn: DqnSettings | None = None, resume: bool = False) -> tuple[Controller, list[dict]]:
    """Train (or resume) the controller; the checkpoint is written after every episode."""
    records: list[dict] = []
    start_episode = 0
    if resume and checkpoint.is_file():
        controller, extra = Controller.load(checkpoint)
        records, start_episode = extra["records"], extra["episode"]
        reward = RewardSettings(**extra["reward"])
    else:
        controller = Controller(env.state_size, env.profiles.names, dqn or DqnSettings(),
                                env.reward_heads(settings.reward_heads))
        calibrate_speed(env, prompts, reward)
    if resume and checkpoint.is_file():
        check_checkpoint_model(extra, env.loaded, checkpoint)
    if controller.actions != env.profiles.names:
        raise LayerwiseError("The checkpoint's profiles differ from this model's profiles.")
    cursor = start_episode * settings.steps_per_episode
    for episode in tqdm(range(start_episode, settings.episodes), desc="runtime train", unit="episode", disable=None):
        condition = settings.conditions[episode % len(settings.conditions)]
        with MachineLoad(condition):
            settle(env, settings.settle_s)
            state, observe_ms = timed_observe(env, prompts[cursor % len(prompts)])
            for step in range(settings.steps_per_episode):
                prompt = prompts[cursor % len(prompts)]
                epsilon = controller.epsilon
                action, record = run_request(env, prompt, state, controller.act, "controller", condition.name,
                                             reward, observe_ms)
                cursor += 1
                next_state, observe_ms = timed_observe(env, prompts[cursor % len(prompts)])
                terms = reward.terms(record.tokens_per_s, record.ppl) if len(controller.heads) > 1 else None
                controller.observe(Transition(state, action, record.reward, next_state,
                                              step == settings.steps_per_episode - 1, terms))
                records.append({**asdict(record), "episode": episode, "epsilon": epsilon})
                state = next_state
        controller.save(checkpoint, {"episode": episode + 1, "records": records, "reward": asdict(reward),
                                     "model": model_identity(env.loaded)})
    return controller, records


def model_identity(loaded) -> dict:
    """What a checkpoint records of the model it was trained on."""
    from ..backends import architecture_signature

    return {"spec": loaded.spec, "architecture": architecture_signature(loaded.model)}


def check_checkpoint_model(extra: dict, loaded, path) -> None:
    """A controller trained on another model refuses to run: its Q-values describe that model's profiles."""
    trained = extra.get("model")
    if trained is not None and trained["architecture"] != model_identity(loaded)["architecture"]:
        raise LayerwiseError(f"The controller checkpoint {path} was trained on {trained['spec']} "
                             f"({trained['architecture']}), not on {loaded.spec}; train one for this model.")


def test(env: RuntimeEnvironment, controller: Controller, prompts: list[Prompt], conditions: list[LoadCondition],
         reward: RewardSettings, fixed: list[str] | None = None, settle_s: float = 1.0) -> list[dict]:
    """Serve every test prompt under every load condition with the learned controller (greedy) and with each
    fixed profile in ``fixed`` (default: all)."""
    policies: dict[str, Policy] = {"controller": lambda state: controller.act(state, explore=False)}
    for name in fixed if fixed is not None else env.profiles.names:
        index = env.profiles.names.index(name)
        policies[f"fixed:{name}"] = lambda state, index=index: index
    records = []
    total = len(conditions) * len(policies) * len(prompts)
    with tqdm(total=total, desc="runtime test", unit="request", disable=None) as bar:
        for condition in conditions:
            with MachineLoad(condition):
                settle(env, settle_s)
                for prompt in prompts:
                    for policy, decide in policies.items():
                        state, observe_ms = timed_observe(env, prompt)
                        _, record = run_request(env, prompt, state, decide, policy, condition.name, reward, observe_ms)
                        records.append(asdict(record))
                        bar.update()
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Mean tokens/s, PPL and reward per (condition, policy), with the profile mix of each policy."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["condition"], record["policy"]), []).append(record)
    rows = []
    for (condition, policy), items in groups.items():
        mix: dict[str, int] = {}
        for item in items:
            mix[item["profile"]] = mix.get(item["profile"], 0) + 1
        def mean(key: str, items: list[dict] = items) -> float:
            return sum(i[key] for i in items) / len(items)

        rows.append({"condition": condition, "policy": policy, "requests": len(items),
                     "tokens_per_s": mean("tokens_per_s"), "ppl": mean("ppl"), "reward": mean("reward"),
                     "switch_ms": mean("switch_ms"), "decide_ms": mean("decide_ms"), "decode_ms": mean("decode_ms"),
                     "profiles": mix})
    return rows
