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

With ``--reward slo`` every request carries a latency objective (``ObjectiveRange``, drawn per request) and the
reward is the served profile's log-likelihood of that continuation (−NLL) when the request finished within its
objective, less a penalty of ``slo_penalty + slo_overrun · overrun / objective`` when it did not. The seed's
reward is still computed and recorded for every request (``seed_reward``).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from ..errors import LayerwiseError
from ..models import LoadedModel
from ..ops import architecture_signature
from ..registry import Registry
from .controller import Controller, DqnSettings, Head, Transition
from .features import PromptFeaturizer
from .generate import Generation, TokenStream, generate
from .heads import StateLayout, reward_heads
from .load import LoadCondition, MachineLoad
from .objectives import ObjectiveRange, SpeedCalibration, calibrate_speeds
from .profiles import Importance, ProfileSet, ProfileSpec, default_specs
from .prompts import Prompt
from .telemetry import Telemetry

MAX_PROMPT_TOKENS = 1024


@dataclass(frozen=True)
class Outcome:
    """What one served request measured."""

    tokens_per_s: float
    ppl: float
    nll: float
    latency_ms: float
    objective_ms: float | None = None

    @property
    def met(self) -> bool | None:
        """Whether the request finished within its objective (None: it had none)."""
        return None if self.objective_ms is None else self.latency_ms <= self.objective_ms


@dataclass
class RewardSettings:
    """The reward: ``mode`` one of ``REWARD_MODES`` (``linear``: the seed's; ``slo``: quality within the objective)."""

    tps_weight: float = 0.6
    ppl_weight: float = 0.4
    tps_scale: float = 1.0  # 0: the dense model's idle tokens/s (measured by calibrate_speed)
    ppl_scale: float = 10.0
    mode: str = "linear"
    # a missed objective costs 8 nats (about the NLL of smollm2-135m with 45% of its blocks skipped: a late
    # answer is worth as little as a broken one), plus 2 per objective's worth of overrun; at 2 nats the dense
    # model was the best fixed profile under every load, since being late cost less than any profile's quality
    slo_penalty: float = 8.0
    slo_overrun: float = 2.0

    def terms(self, outcome: Outcome) -> list[float]:
        """The reward's terms, in the order of ``RuntimeEnvironment.reward_heads(mode)``; the reward is their sum."""
        return REWARD_MODES.get(self.mode)(self, outcome)

    def reward(self, outcome: Outcome) -> float:
        return sum(self.terms(outcome))

    def seed_reward(self, outcome: Outcome) -> float:
        """The seed's ``0.6·tokens/s − 0.4·PPL/10`` (with this setting's weights and scales), whatever the mode."""
        return sum(_linear_terms(self, outcome))


def _linear_terms(reward: RewardSettings, outcome: Outcome) -> list[float]:
    """Speed and quality: ``tps_weight · tokens/s / tps_scale`` and ``−ppl_weight · PPL / ppl_scale``."""
    return [reward.tps_weight * outcome.tokens_per_s / (reward.tps_scale or 1.0),
            -reward.ppl_weight * outcome.ppl / reward.ppl_scale]


def _slo_terms(reward: RewardSettings, outcome: Outcome) -> list[float]:
    """Quality (−NLL of the reference continuation) and the objective's penalty (0 when met)."""
    if outcome.objective_ms is None:
        raise LayerwiseError("The slo reward needs a latency objective per request (--slo-ms).")
    overrun = max(0.0, outcome.latency_ms - outcome.objective_ms) / outcome.objective_ms
    return [-outcome.nll, 0.0 if outcome.met else -(reward.slo_penalty + reward.slo_overrun * overrun)]


def require_objectives(reward: RewardSettings, objectives: ObjectiveRange | None) -> None:
    """The slo reward scores every request against its objective: refuse it without a range to draw them from."""
    if reward.mode == "slo" and objectives is None:
        raise LayerwiseError("--reward slo needs latency objectives: give --slo-ms LOW:HIGH.")


REWARD_MODES: Registry[Callable[[RewardSettings, Outcome], list[float]]] = Registry("reward mode")
REWARD_MODES.add("linear", _linear_terms)
REWARD_MODES.add("slo", _slo_terms)


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
    nll: float = float("nan")
    seed_reward: float = float("nan")
    prompt_tokens: int = 0
    objective_ms: float | None = None
    met: bool | None = None
    state: list[float] | None = None  # what the policy saw: a test can be replayed through another controller
    prefill_ms: float = float("nan")  # the part of decode_ms (the whole request) before the first token


class RuntimeEnvironment:
    """The model with its profiles, the observation, and a cache of reference continuations."""

    def __init__(self, loaded: LoadedModel, calibration: Any, max_new_tokens: int, mechanism: str = "sliced",
                 importance: str = "act", specs: list[ProfileSpec] | None = None,
                 speed_calibration: SpeedCalibration | None = None) -> None:
        """``importance``: a width scorer of the Profile (``act`` magnitude, ``taylor``), computed once;
        ``specs``: the profiles (default: ``default_specs()``). Every profile's idle latency is timed here."""
        self.loaded = loaded
        self.max_new_tokens = max_new_tokens
        self.profiles = ProfileSet(loaded.model, Importance.from_calibration(loaded.model, calibration, importance),
                                   specs or default_specs(), mechanism=mechanism)
        self.featurizer = PromptFeaturizer(loaded.tokenizer)
        self.telemetry = Telemetry()
        self.references: dict[str, list[int]] = {}
        self.context = getattr(loaded.model.config, "max_position_embeddings", None)
        self.speeds = calibrate_speeds(self.profiles, loaded.model, len(loaded.tokenizer), self.context,
                                       speed_calibration)

    @property
    def layout(self) -> StateLayout:
        return StateLayout(len(self.profiles.names))

    @property
    def state_size(self) -> int:
        return self.layout.size

    def reward_heads(self, mode: str = "linear") -> dict[str, Head]:
        """The controller's heads, one per term of the reward (``RewardSettings.terms``)."""
        return reward_heads(self.layout, mode)

    def observe(self, prompt: Prompt, objective_ms: float | None = None, new_tokens: int | None = None,
                prompt_tokens: int | None = None) -> list[float]:
        """The state: telemetry, prompt features, the objective and every profile's predicted latency.
        ``prompt_tokens``: the prompt's length when the caller has tokenized it already (``tokenize``)."""
        full = prompt_tokens if prompt_tokens is not None else self.tokenize(prompt)[1]
        tokens = min(full, MAX_PROMPT_TOKENS)  # what is served: the prompt's last MAX_PROMPT_TOKENS tokens
        return (self.telemetry.vector() + self.featurizer(prompt.text, full)
                + self.speeds.features(tokens, new_tokens or self.max_new_tokens, objective_ms))

    def idle_latency_ms(self, prompt: Prompt, new_tokens: int | None = None) -> float:
        """The dense model's latency for ``prompt`` on an idle machine, from its line timed at start-up."""
        tokens = min(self.tokenize(prompt)[1], MAX_PROMPT_TOKENS)
        return self.speeds.lines["none"].predict(tokens, new_tokens or self.max_new_tokens)

    def tokenize(self, prompt: Prompt) -> tuple[torch.Tensor, int]:
        """The ids served (the prompt's last ``MAX_PROMPT_TOKENS`` tokens) and the prompt's whole length."""
        ids = self.loaded.tokenizer(prompt.text, return_tensors="pt")["input_ids"]
        return ids[:, -MAX_PROMPT_TOKENS:], ids.shape[1]

    def ids(self, prompt: Prompt) -> torch.Tensor:
        return self.tokenize(prompt)[0]

    def reference(self, prompt: Prompt) -> list[int]:
        """The dense model's greedy continuation of ``prompt`` (computed once)."""
        if prompt.text not in self.references:
            self.profiles.restore()
            self.references[prompt.text] = generate(self.loaded.model, self.ids(prompt), self.max_new_tokens).new_tokens
        return self.references[prompt.text]

    def serve(self, prompt: Prompt, profile: str, observe: bool = False) -> tuple[Generation, float]:
        """Decode under ``profile`` teacher-forced on the reference; (generation, switching time in ms: into the
        profile and back to dense). ``observe``: fold the measured times into the running speed estimates."""
        forced = self.reference(prompt)
        serving = Serving(self, profile, self.ids(prompt), self.max_new_tokens, forced=forced, observe=observe).run()
        return serving.generation, serving.switch_ms


class Serving:
    """One request under one profile, the path the test harness and the server share: switch in, decode
    (iterate for the tokens as they are chosen), switch back to dense whatever happens, then fold the measured
    prefill and decoding times into the speed estimates (``observe``). ``generation`` and ``switch_ms`` (into the
    profile and back) are there once the iteration has finished."""

    def __init__(self, env: RuntimeEnvironment, profile: str, ids: torch.Tensor, new_tokens: int,
                 forced: list[int] | None = None, eos_token_id: int | None = None, observe: bool = True) -> None:
        self.env, self.profile, self.ids, self.new_tokens = env, profile, ids, new_tokens
        self.forced, self.eos_token_id, self.observe = forced, eos_token_id, observe
        self.switch_ms = 0.0
        self.generation: Generation | None = None

    def __iter__(self) -> Iterator[int]:
        env = self.env
        start = time.perf_counter()
        env.profiles.activate(self.profile)
        self.switch_ms = 1000 * (time.perf_counter() - start)
        stream = TokenStream(env.loaded.model, self.ids, self.new_tokens, env.profiles.kv_eviction(),
                             eos_token_id=self.eos_token_id, forced=self.forced)
        try:
            yield from stream
        finally:
            start = time.perf_counter()
            env.profiles.restore()
            self.switch_ms += 1000 * (time.perf_counter() - start)
        self.generation = generation = stream.result
        if self.observe:
            env.speeds.observe(self.profile, generation.prompt_length, len(generation.new_tokens),
                               1000 * generation.prefill_s, 1000 * generation.decode_s)

    def run(self) -> "Serving":
        """Decode to the end."""
        for _ in self:
            pass
        return self


Policy = Callable[[list[float]], int]


def run_request(env: RuntimeEnvironment, prompt: Prompt, state: list[float], decide: Policy, policy: str,
                condition: str, reward: RewardSettings, observe_ms: float,
                objective_ms: float | None = None) -> tuple[int, RequestRecord, list[float]]:
    """Pick a profile for ``state`` and serve ``prompt`` with it; the reward's terms come back too."""
    start = time.perf_counter()
    action = decide(state)
    decide_ms = observe_ms + 1000 * (time.perf_counter() - start)
    profile = env.profiles.names[action]
    generation, switch_ms = env.serve(prompt, profile, observe=True)
    latency_ms = generation.latency_ms
    outcome = Outcome(generation.tokens_per_s, generation.perplexity, generation.nll, latency_ms, objective_ms)
    terms = reward.terms(outcome)
    return action, RequestRecord(condition, prompt.source, policy, profile, generation.tokens_per_s,
                                 generation.perplexity, sum(terms), switch_ms, decide_ms, latency_ms,
                                 nll=generation.nll, seed_reward=reward.seed_reward(outcome),
                                 prompt_tokens=generation.prompt_length, objective_ms=objective_ms,
                                 met=outcome.met, state=state, prefill_ms=1000 * generation.prefill_s), terms


def timed_observe(env: RuntimeEnvironment, prompt: Prompt, objective_ms: float | None = None) -> tuple[list[float], float]:
    """The state and the milliseconds it took. Tokenizing is serving's, not the controller's: every policy, a
    fixed profile too, needs the ids (the server tokenizes once on admission), so it is left out of the time."""
    prompt_tokens = env.tokenize(prompt)[1]
    start = time.perf_counter()
    state = env.observe(prompt, objective_ms, prompt_tokens=prompt_tokens)
    return state, 1000 * (time.perf_counter() - start)


def draw_objectives(env: RuntimeEnvironment, objectives: ObjectiveRange | None, prompts: list[Prompt],
                    seed: int) -> list[float | None]:
    """One objective in ms per request of ``prompts``, reproducible from ``seed`` (None everywhere without a
    range); a relative range's factor times the dense model's idle latency for that prompt."""
    rng = random.Random(seed)
    if objectives is None:
        return [None] * len(prompts)
    drawn = [objectives.draw(rng) for _ in prompts]
    if objectives.relative:
        return [factor * env.idle_latency_ms(prompt) for factor, prompt in zip(drawn, prompts)]
    return drawn


def settle(env: RuntimeEnvironment, seconds: float) -> None:
    """Give a freshly started load time to show, and start the telemetry's CPU window inside it."""
    time.sleep(seconds)
    env.telemetry.external_cpu()


# Dense requests served, unrecorded, after each load starts, so that the running slowdowns (each request moves
# them halfway) describe the new load before any state is learned from or compared: 3 leave 1/8 of the old one.
# Training used to change the load every few requests with the last load's slowdowns in the first state, and
# 24% of those first requests missed an objective their state predicted to meet with room (1% of the others):
# the objective's head learned that a comfortable prediction still misses. It overrated the slow profiles'
# penalty by ~2 nats idle; retrained from the same buffer without those requests, by about half as much.
WARM_REQUESTS = 3


def warm_speeds(env: RuntimeEnvironment, prompt: Prompt, requests: int = WARM_REQUESTS) -> None:
    """Serve ``prompt`` densely ``requests`` times, unrecorded, to move the running slowdowns to the load now."""
    for _ in range(requests):
        env.serve(prompt, env.profiles.names[0], observe=True)


def calibrate_speed(env: RuntimeEnvironment, prompts: list[Prompt], reward: RewardSettings) -> None:
    """Set ``tps_scale`` to the dense model's idle tokens/s on a few prompts when it is 0."""
    if not reward.tps_scale:
        speeds = [env.serve(p, env.profiles.names[0])[0].tokens_per_s for p in prompts[:3]]
        reward.tps_scale = sorted(speeds)[len(speeds) // 2]


@dataclass
class TrainSettings:
    episodes: int = 50
    steps_per_episode: int = 10
    conditions: list[LoadCondition] = field(default_factory=list)
    settle_s: float = 1.0  # wait after starting a load so the telemetry sees it
    objectives: ObjectiveRange | None = None  # latency objectives drawn per request (needed by the slo reward)
    # serve every training request under every profile too, each outcome one transition from the same state:
    # a request's state does not depend on which profile served the one before, so each is a true sample of
    # its action, and every state teaches every action (full-information feedback, no exploration needed)
    counterfactual: bool = False
    warm_requests: int = WARM_REQUESTS  # dense, unrecorded, after each load starts (``warm_speeds``)
    seed: int = 0


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
                                env.reward_heads(reward.mode))
        calibrate_speed(env, prompts, reward)
    if resume and checkpoint.is_file():
        check_checkpoint_model(extra, env.loaded, checkpoint)
    if controller.actions != env.profiles.names:
        raise LayerwiseError("The checkpoint's profiles differ from this model's profiles.")
    require_objectives(reward, settings.objectives)
    total = settings.episodes * settings.steps_per_episode
    objectives = draw_objectives(env, settings.objectives, [prompts[i % len(prompts)] for i in range(total + 1)],
                                 settings.seed)
    cursor = start_episode * settings.steps_per_episode
    for episode in tqdm(range(start_episode, settings.episodes), desc="runtime train", unit="episode", disable=None):
        condition = settings.conditions[episode % len(settings.conditions)]
        with MachineLoad(condition):
            settle(env, settings.settle_s)
            warm_speeds(env, prompts[cursor % len(prompts)], settings.warm_requests)
            state, observe_ms = timed_observe(env, prompts[cursor % len(prompts)], objectives[cursor])
            for step in range(settings.steps_per_episode):
                prompt = prompts[cursor % len(prompts)]
                epsilon = controller.epsilon
                action, record, terms = run_request(env, prompt, state, controller.act, "controller",
                                                    condition.name, reward, observe_ms, objectives[cursor])
                outcomes = [(action, terms)]
                if settings.counterfactual:
                    outcomes += _other_profiles(env, prompt, state, action, condition.name, reward, objectives[cursor])
                cursor += 1
                next_state, observe_ms = timed_observe(env, prompts[cursor % len(prompts)], objectives[cursor])
                for served, served_terms in outcomes:  # the reward is its terms' sum (run_request)
                    controller.observe(Transition(state, served, sum(served_terms), next_state,
                                                  step == settings.steps_per_episode - 1,
                                                  served_terms if len(controller.heads) > 1 else None))
                records.append({**asdict(record), "episode": episode, "epsilon": epsilon})
                state = next_state
        controller.save(checkpoint, {"episode": episode + 1, "records": records, "reward": asdict(reward),
                                     "model": model_identity(env.loaded),
                                     "objectives": str(settings.objectives) if settings.objectives else None,
                                     "warm_requests": settings.warm_requests})
    return controller, records


def _other_profiles(env: RuntimeEnvironment, prompt: Prompt, state: list[float], chosen: int, condition: str,
                    reward: RewardSettings, objective_ms: float | None) -> list[tuple[int, list[float]]]:
    """Serve ``prompt`` under every profile but ``chosen``; (action, reward terms) of each."""
    served = []
    for other in range(len(env.profiles.names)):
        if other != chosen:
            _, _, terms = run_request(env, prompt, state, lambda _state, index=other: index, "counterfactual",
                                      condition, reward, 0.0, objective_ms)
            served.append((other, terms))
    return served


def model_identity(loaded) -> dict:
    """What a checkpoint records of the model it was trained on."""

    return {"spec": loaded.spec, "architecture": architecture_signature(loaded.model)}


def check_checkpoint_model(extra: dict, loaded, path) -> None:
    """A controller trained on another model refuses to run: its Q-values describe that model's profiles."""
    trained = extra.get("model")
    if trained is not None and trained["architecture"] != model_identity(loaded)["architecture"]:
        raise LayerwiseError(f"The controller checkpoint {path} was trained on {trained['spec']} "
                             f"({trained['architecture']}), not on {loaded.spec}; train one for this model.")


def fixed_policies(env: RuntimeEnvironment, names: list[str] | None = None) -> dict[str, Policy]:
    """``fixed:<profile>`` for each profile in ``names`` (default: all): always that profile."""
    def always(index: int) -> Policy:
        return lambda state: index

    return {f"fixed:{name}": always(env.profiles.names.index(name))
            for name in (names if names is not None else env.profiles.names)}


def compare(env: RuntimeEnvironment, policies: dict[str, Policy], prompts: list[Prompt],
            conditions: list[LoadCondition], reward: RewardSettings, objectives: ObjectiveRange | None = None,
            seed: int = 0, settle_s: float = 1.0, desc: str = "runtime test",
            warm_requests: int = WARM_REQUESTS) -> list[dict]:
    """Serve every prompt under every load condition with every policy, back to back: the same prompt gets the
    same objective under every load and policy, so the records pair up (condition, prompt index). The order of
    the policies rotates from prompt to prompt, and the dense reference is computed before any of them: in one
    run where the controller always went first, its requests ran a median 1-3% slower than the same profile's
    later ones under three loads of four, a cost that fell on it alone."""
    drawn = draw_objectives(env, objectives, prompts, seed + 1)  # not the training draw
    records = []
    names = list(policies)
    total = len(conditions) * len(policies) * len(prompts)
    with tqdm(total=total, desc=desc, unit="request", disable=None) as bar:
        for condition in conditions:
            with MachineLoad(condition):
                settle(env, settle_s)
                warm_speeds(env, prompts[0], warm_requests)
                for index, (prompt, objective) in enumerate(zip(prompts, drawn)):
                    env.reference(prompt)
                    shift = index % len(names)
                    for policy in names[shift:] + names[:shift]:
                        decide = policies[policy]
                        state, observe_ms = timed_observe(env, prompt, objective)
                        _, record, _ = run_request(env, prompt, state, decide, policy, condition.name, reward,
                                                   observe_ms, objective)
                        records.append({**asdict(record), "prompt": index})
                        bar.update()
    return records


def profile_quality(env: RuntimeEnvironment, prompts: list[Prompt]) -> dict[str, float]:
    """Each profile's mean NLL of the dense model's greedy continuation of ``prompts`` (teacher-forced, as the
    reward scores it): the quality ranking a rule needs, measured once at start-up, idle."""
    totals = {name: 0.0 for name in env.profiles.names}
    for prompt in tqdm(prompts, desc="profile quality", unit="prompt", disable=None):
        for name in env.profiles.names:
            totals[name] += env.serve(prompt, name)[0].nll
    return {name: total / max(1, len(prompts)) for name, total in totals.items()}


def predicted_rule(env: RuntimeEnvironment, quality: dict[str, float]) -> Policy:
    """The no-learning baseline: the best-quality profile (lowest ``quality`` NLL) whose ``SpeedEstimates``
    prediction in the state meets the request's objective, else the one predicted fastest. It reads only the
    state's predicted-latency ratios (log predicted / objective), which the controller sees as well."""
    predicted = env.layout.predicted
    by_quality = sorted(range(len(env.profiles.names)), key=lambda index: quality[env.profiles.names[index]])

    def decide(state: list[float]) -> int:
        ratios = [state[i] for i in predicted]
        meeting = [index for index in by_quality if ratios[index] <= 0.0]
        return meeting[0] if meeting else min(range(len(ratios)), key=ratios.__getitem__)

    return decide


def test(env: RuntimeEnvironment, controllers: dict[str, Controller], prompts: list[Prompt],
         conditions: list[LoadCondition], reward: RewardSettings, fixed: list[str] | None = None,
         settle_s: float = 1.0, objectives: ObjectiveRange | None = None, seed: int = 0,
         quality: dict[str, float] | None = None) -> list[dict]:
    """Serve every test prompt under every load condition with each learned controller (greedy, named by its
    key), the ``no-learning`` rule when ``quality`` ranks the profiles, and each fixed profile in ``fixed``
    (default: all)."""
    policies: dict[str, Policy] = {name: (lambda state, c=controller: c.act(state, explore=False))
                                   for name, controller in controllers.items()}
    if quality is not None:
        policies["no-learning"] = predicted_rule(env, quality)
    policies.update(fixed_policies(env, fixed))
    return compare(env, policies, prompts, conditions, reward, objectives, seed, settle_s)


def retrain(source: Path, checkpoint: Path, seed: int, gamma: float) -> Controller:
    """A new controller (its ``seed`` and discount ``gamma``, the source's other settings) trained on the
    transitions ``source``'s controller observed, in the order it observed them: with ``--counterfactual`` every
    training request was served under every profile, so the log holds the same data whatever the controller
    chose, and training seeds and discounts compare on one set of served requests. The source's records and
    settings are kept with it."""
    trained, extra = Controller.load(source)
    if trained.steps != len(trained.buffer):
        raise LayerwiseError(f"{source} kept {len(trained.buffer)} of the {trained.steps} transitions it observed "
                             "(its replay buffer is smaller): it cannot be retrained from its log.")
    settings = replace(trained.settings, seed=seed, gamma=gamma)
    controller = Controller(trained.state_size, trained.actions, settings, trained.heads)
    for transition in tqdm(list(trained.buffer.items), desc="runtime retrain", unit="transition", disable=None):
        controller.observe(transition)
    controller.save(checkpoint, {**extra, "retrained_from": str(source)})
    return controller


def oracle_table(records: list[dict]) -> list[dict]:
    """Per condition, the fixed profiles ranked by mean reward: which single profile an oracle would pin there."""
    rows = [row for row in summarize(records) if row["policy"].startswith("fixed:")]
    table = []
    for condition in dict.fromkeys(row["condition"] for row in rows):
        ranked = sorted((row for row in rows if row["condition"] == condition), key=lambda row: -row["reward"])
        table.append({"condition": condition, "best": ranked[0]["policy"].removeprefix("fixed:"),
                      "ranking": [(row["policy"].removeprefix("fixed:"), row["reward"], row["attainment"])
                                  for row in ranked]})
    return table


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

        judged = [item["met"] for item in items if item.get("met") is not None]
        rows.append({"condition": condition, "policy": policy, "requests": len(items),
                     "tokens_per_s": mean("tokens_per_s"), "ppl": mean("ppl"), "reward": mean("reward"),
                     "switch_ms": mean("switch_ms"), "decide_ms": mean("decide_ms"), "decode_ms": mean("decode_ms"),
                     "nll": mean("nll") if all("nll" in i for i in items) else float("nan"),
                     "seed_reward": mean("seed_reward") if all("seed_reward" in i for i in items) else float("nan"),
                     "attainment": sum(judged) / len(judged) if judged else None, "profiles": mix})
    return rows
