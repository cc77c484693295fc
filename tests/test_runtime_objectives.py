"""Latency objectives for the runtime controller: the slo reward, the speed estimates in the state, the
per-action head, cached profile switches, and the server's objectives and OpenAI-compatible endpoints."""

from __future__ import annotations

import math
import random
import socket
import threading
import time

import pytest
import torch

from layerwise.errors import LayerwiseError
from layerwise.runtime.controller import Controller, DqnSettings, Head, PerActionQNetwork, Transition
from layerwise.runtime.heads import StateLayout
from layerwise.runtime.objectives import LatencyLine, ObjectiveError, ObjectiveRange, SpeedCalibration, SpeedEstimates
from layerwise.runtime.session import Outcome, RewardSettings

FAST_CALIBRATION = SpeedCalibration(short=8, long=64, new_tokens=3, repeats=1)


def test_slo_reward_pays_quality_within_the_objective_and_a_scaled_penalty_beyond_it():
    reward = RewardSettings(mode="slo", slo_penalty=2.0, slo_overrun=3.0)
    met = Outcome(tokens_per_s=20.0, ppl=math.exp(0.5), nll=0.5, latency_ms=900.0, objective_ms=1000.0)
    assert met.met and reward.terms(met) == [-0.5, 0.0]
    late = Outcome(20.0, math.exp(0.5), 0.5, latency_ms=1500.0, objective_ms=1000.0)
    assert not late.met and reward.terms(late) == pytest.approx([-0.5, -(2.0 + 3.0 * 0.5)])
    assert reward.reward(late) == pytest.approx(-4.0)
    # the seed's reward is reported beside it, whatever the mode
    assert reward.seed_reward(late) == pytest.approx(0.6 * 20.0 - 0.4 * math.exp(0.5) / 10)
    assert RewardSettings().reward(late) == pytest.approx(reward.seed_reward(late))
    with pytest.raises(LayerwiseError, match="--slo-ms"):
        reward.terms(Outcome(20.0, 2.0, 0.7, 900.0, None))


def test_objective_ranges_parse_and_draw_log_uniformly_and_reproducibly():
    span = ObjectiveRange.parse("200:3200")
    draws = [span.draw(random.Random(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    values = [span.draw(random.Random(seed)) for seed in range(400)]
    assert 200 <= min(values) and max(values) <= 3200
    below = sum(v < 800 for v in values) / len(values)  # log-uniform: half the mass below the geometric mean
    assert 0.4 < below < 0.6
    assert ObjectiveRange.parse("750") == ObjectiveRange(750, 750)
    relative = ObjectiveRange.parse("0.5x:4x")
    assert relative == ObjectiveRange(0.5, 4.0, relative=True) and ObjectiveRange.parse(str(relative)) == relative
    assert ObjectiveRange.parse("2x") == ObjectiveRange(2.0, 2.0, relative=True) and str(span) == "200:3200"
    for bad in ("fast", "900:300", "0:10", "x:2x"):
        with pytest.raises(ObjectiveError):
            ObjectiveRange.parse(bad)


def test_relative_objectives_scale_with_each_prompts_idle_dense_latency(tiny, calibration):
    """A relative range draws the same factors an absolute one draws milliseconds, times the dense model's idle
    latency for that prompt (its line timed at start-up): a passage gets a longer objective than a question."""
    from layerwise.runtime.profiles import parse_profiles
    from layerwise.runtime.prompts import Prompt
    from layerwise.runtime.session import RuntimeEnvironment, draw_objectives

    env = RuntimeEnvironment(tiny, calibration, 3, specs=parse_profiles("ffn_neurons@0.5"),
                             speed_calibration=FAST_CALIBRATION)
    env.speeds.lines["none"] = LatencyLine(20.0, 0.5, 10.0, 0.0)  # exact numbers: 20 + 0.5·tokens + 2·10 ms
    prompts = [Prompt("q", "Why is the sky blue?"), Prompt("wiki", " ".join(["word"] * 300))]
    factors = draw_objectives(env, ObjectiveRange(0.5, 4.0), prompts, seed=3)
    objectives = draw_objectives(env, ObjectiveRange(0.5, 4.0, relative=True), prompts, seed=3)
    for factor, objective, prompt in zip(factors, objectives, prompts):
        assert 0.5 <= factor <= 4.0
        assert objective == pytest.approx(factor * (40 + 0.5 * min(1024, env.tokenize(prompt)[1])))  # served: the last 1024
    assert env.idle_latency_ms(prompts[1]) > 2 * env.idle_latency_ms(prompts[0])
    assert draw_objectives(env, None, prompts, seed=3) == [None, None]


def test_speed_estimates_fit_two_points_and_follow_the_prefill_and_decoding_slowdowns_apart():
    line = LatencyLine.through((16, 60.0, 40.0), (1016, 1460.0, 45.0))
    assert line.prefill_ms_per_token == pytest.approx(1.4) and line.step_ms_per_token == pytest.approx(0.005)
    assert line.predict(16, 1) == pytest.approx(60.0) and line.predict(516, 11) == pytest.approx(760 + 10 * 42.5)
    estimates = SpeedEstimates({"none": line, "fast": LatencyLine(30.0, 0.7, 25.0, 0.0)}, smoothing=0.5,
                               factor_smoothing=0.0)  # the slowdowns alone; the profiles' factors below
    assert estimates.fastest(100, 10)[0] == "fast"
    # a loaded machine: prefill five times slower than idle, decoding twice
    estimates.observe("none", 100, 10, 5 * line.prefill(100), 2 * line.decoding(100, 10))
    assert (estimates.prefill_slowdown, estimates.decode_slowdown) == pytest.approx((3.0, 1.5))
    assert estimates.predict("fast", 100, 10) == pytest.approx(3.0 * (30 + 70) + 1.5 * 9 * 25)
    # a long passage is mostly prefill, a short question mostly decoding: each follows its own phase's slowdown
    long_ratio = estimates.predict("none", 1000, 10) / line.predict(1000, 10)
    short_ratio = estimates.predict("none", 16, 10) / line.predict(16, 10)
    assert 2.5 < long_ratio < 3.0 and 1.5 < short_ratio < 1.8
    estimates.observe("fast", 100, 1, 2 * 100.0, 0.0)  # one token: no decoding step to learn from
    assert (estimates.prefill_slowdown, estimates.decode_slowdown) == pytest.approx((2.5, 1.5))
    objective, prefill, decode, *ratios = estimates.features(100, 10, 500.0)
    assert objective == pytest.approx(math.log(0.5))
    assert (prefill, decode) == pytest.approx((math.log(2.5), math.log(1.5)))
    assert ratios == pytest.approx([math.log(estimates.predict(p, 100, 10) / 500) for p in ("none", "fast")])
    assert estimates.features(100, 10, 1.0)[3:] == [2.0, 2.0]  # clipped


def test_profile_factors_learn_what_start_up_timing_got_wrong_and_leave_load_changes_to_the_slowdowns():
    lines = {"none": LatencyLine(40.0, 0.5, 30.0, 0.0), "fast": LatencyLine(30.0, 0.3, 20.0, 0.0),
             "faster": LatencyLine(20.0, 0.2, 15.0, 0.0)}
    truth = {"none": 1.0, "fast": 1.15, "faster": 0.9}  # served / idle line, whatever the load

    def serve(estimates: SpeedEstimates, profile: str, load: float, tokens: int = 100) -> float:
        """Observe one request; its relative prediction error before it was folded in."""
        line, scale = lines[profile], truth[profile] * load
        predicted = estimates.predict(profile, tokens, 8)
        estimates.observe(profile, tokens, 8, scale * line.prefill(tokens), scale * line.decoding(tokens, 8))
        return scale * line.predict(tokens, 8) / predicted - 1

    estimates = SpeedEstimates(dict(lines))
    errors = [serve(estimates, name, load) for load in (1.0, 2.0, 1.0) for _ in range(40) for name in lines]
    assert max(abs(e) for e in errors[:3]) > 0.1  # the start-up lines were 10-15% off for two profiles
    assert max(abs(e) for e in errors[-30:]) < 0.02  # learned: every profile within 2%, back at idle
    assert math.prod(estimates.factors.values()) == pytest.approx(1.0)
    geometric = math.prod(truth.values()) ** (1 / 3)
    assert estimates.factors["fast"] / estimates.factors["none"] == pytest.approx(1.15, rel=0.02)
    assert estimates.prefill_slowdown == pytest.approx(geometric, rel=0.02)  # the machine, not a profile

    # a load change seen through one profile only: the slowdowns take it; the factor moves by at most
    # smoothing × clip per request, and the profiles not served keep their predictions but for the slowdowns
    steady = SpeedEstimates(dict(lines), factors=dict(estimates.factors), prefill_slowdown=geometric,
                            decode_slowdown=geometric)
    before = dict(steady.factors)
    for _ in range(6):
        serve(steady, "none", 3.0)
    relative = steady.factors["fast"] / steady.factors["faster"]
    assert relative == pytest.approx(before["fast"] / before["faster"])
    moved = math.log(steady.factors["none"] / before["none"]) - math.log(steady.factors["fast"] / before["fast"])
    assert 0 < moved <= 6 * 0.1 * 0.2 + 1e-9
    assert steady.predict("fast", 100, 8) / (3.0 * 1.15 * lines["fast"].predict(100, 8)) > 0.94


def test_idle_lines_time_the_profiles_round_by_round_and_keep_each_points_median_run(monkeypatch):
    """A drift during start-up must not land on whichever profile happened to be timed then."""
    import contextlib

    from layerwise.runtime import objectives
    from layerwise.runtime.generate import Generation
    from layerwise.runtime.objectives import calibrate_speeds

    class Profiles:
        names = ["none", "fast"]
        active = "none"

        @contextlib.contextmanager
        def using(self, name):
            self.active = name
            yield
            self.active = "none"

        def kv_eviction(self):
            return None

    profiles, timed = Profiles(), []

    def fake_generate(model, ids, new_tokens, eviction=None, forced=None):
        length = ids.shape[1]
        timed.append((profiles.active, length, new_tokens))
        speed = 1.0 if profiles.active == "none" else 0.5
        interrupted = 5.0 if len([t for t in timed if t[2] == 4]) == 3 else 1.0  # one run was preempted
        return Generation(length, list(range(new_tokens)), interrupted * speed * (0.010 + 0.001 * length),
                          interrupted * speed * 0.002 * (new_tokens - 1), length + new_tokens)

    monkeypatch.setattr(objectives, "generate", fake_generate)
    calibration = SpeedCalibration(short=10, long=110, new_tokens=4, repeats=3)
    estimates = calibrate_speeds(profiles, None, 100, 1000, calibration)
    warm_ups, runs = timed[:4], [(name, length) for name, length, _ in timed[4:]]
    assert all(new_tokens == 2 for *_, new_tokens in warm_ups) and len(runs) == 12
    assert runs == [(name, length) for _ in range(3) for name in ("none", "fast") for length in (10, 110)]
    # the preempted run (the 3rd timed: fast at 10 tokens) is not the point's time; the median of 3 is
    assert estimates.lines["fast"].prefill(10) == pytest.approx(0.5 * (10 + 1 * 10))
    assert estimates.lines["none"].prefill_ms_per_token == pytest.approx(1.0)
    assert estimates.lines["fast"].step_ms == pytest.approx(1.0) and estimates.lines["none"].step_ms == pytest.approx(2.0)
    # a context of 20 tokens leaves both points at 10 tokens: a flat line through their median times
    flat = calibrate_speeds(profiles, None, 100, 20, calibration).lines["fast"]
    assert flat.prefill_ms_per_token == 0 and flat.prefill(10) == pytest.approx(0.5 * (10 + 1 * 10))


def test_per_action_head_learns_which_profiles_meet_the_objective_from_their_own_feature():
    """Three actions: 0 is the most accurate and slowest. The state holds each action's log(predicted latency /
    objective); missing costs 3. The learned greedy choice is the most accurate action that meets it (or, when none
    does, the most accurate one)."""
    quality = [-0.5, -1.0, -2.0]
    speed = [1.0, 0.6, 0.3]
    heads = {"quality": Head((0,)), "objective": Head((0,), per_action=(1, 2, 3))}
    controller = Controller(4, ["a", "b", "c"], DqnSettings(seed=0, gamma=0.0, warmup=32, epsilon_decay_steps=300,
                                                           learning_rate=3e-3), heads)
    rng = random.Random(0)

    def state() -> list[float]:
        objective = math.exp(rng.uniform(math.log(0.2), math.log(1.5)))
        return [0.0, *(math.log(s / objective) for s in speed)]

    current = state()
    for _ in range(900):
        action = controller.act(current)
        terms = [quality[action], 0.0 if current[1 + action] <= 0 else -3.0]
        following = state()
        controller.observe(Transition(current, action, sum(terms), following, False, terms))
        current = following
    right = 0
    for _ in range(200):
        probe = state()
        earned = [quality[a] + (0.0 if probe[1 + a] <= 0 else -3.0) for a in range(3)]
        right += controller.act(probe, explore=False) == max(range(3), key=earned.__getitem__)
    assert right >= 170, right
    network = controller.online.heads[1]
    assert isinstance(network, PerActionQNetwork) and network(torch.zeros(5, 4)).shape == (5, 3)


def test_profiles_switch_by_replaying_built_swaps_and_restore_the_dense_model(tiny, calibration):
    from layerwise.models.adapter import get_adapter
    from layerwise.runtime.profiles import Importance, ProfileSet, parse_profiles

    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        dense = tiny.model(tokens).logits
    specs = parse_profiles("ffn_neurons@0.5,transformer_layers@0.5,attention_heads@0.5")
    assert [s.name for s in specs] == ["none", "ffn_neurons@0.5", "transformer_layers@0.5", "attention_heads@0.5"]
    profiles = ProfileSet(tiny.model, Importance.from_calibration(tiny.model, calibration), specs)
    adapter = get_adapter(tiny.model)
    with torch.no_grad():
        ordered = tiny.model(tokens).logits  # reordered by importance: the same function
        outputs = {}
        for name in profiles.names[1:]:
            with profiles.using(name):
                first = [m for m in tiny.model.modules()]
                outputs[name] = tiny.model(tokens).logits
            with profiles.using(name):
                assert [m for m in tiny.model.modules()] == first  # the very same modules: built once
                assert torch.equal(tiny.model(tokens).logits, outputs[name])
        assert torch.equal(tiny.model(tokens).logits, ordered)
    assert torch.allclose(ordered, dense, atol=1e-5)
    assert not any(adapter.attention(b).removed for b in range(adapter.num_blocks))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served(tiny, calibration):
    """The app over tiny-llama (with a chat template) on a real port, for the openai client."""
    import uvicorn

    from layerwise.runtime.server import create_app
    from layerwise.runtime.session import RuntimeEnvironment

    tiny.tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    env = RuntimeEnvironment(tiny, calibration, 0, speed_calibration=FAST_CALIBRATION)
    controller = Controller(env.state_size, env.profiles.names, DqnSettings(seed=3),
                            env.reward_heads("slo"))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(env, controller), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield env, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    del tiny.tokenizer.chat_template


def test_openai_client_completes_chats_and_streams_with_objectives_and_metrics(served):
    import httpx
    import openai

    env, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    completion = client.completions.create(model="tiny-llama", prompt="Plants absorb", max_tokens=6,
                                           extra_body={"max_latency_ms": 60000})
    choice = completion.choices[0]
    assert completion.usage.completion_tokens <= 6 and choice.finish_reason in ("stop", "length")
    extra = completion.model_extra["layerwise"]
    assert extra["profile"] in env.profiles.names and extra["objective_ms"] == 60000 and extra["met"] is True
    chat = client.chat.completions.create(model="tiny-llama", max_tokens=5,
                                          messages=[{"role": "user", "content": "Which gas do plants absorb?"}])
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    prompt_tokens = len(env.loaded.tokenizer("<user>Which gas do plants absorb?\n<assistant>")["input_ids"])
    assert chat.usage.prompt_tokens == prompt_tokens  # the tokenizer's chat template, applied by the server
    pieces = list(client.chat.completions.create(model="tiny-llama", max_tokens=5, stream=True,
                                                 messages=[{"role": "user", "content": "Name a gas."}]))
    assert pieces[0].choices[0].delta.role == "assistant" and pieces[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(p.choices[0].delta.content or "" for p in pieces)
    whole = client.chat.completions.create(model="tiny-llama", max_tokens=5,
                                           messages=[{"role": "user", "content": "Name a gas."}])
    # the same greedy text, streamed or not (when the controller picks the same profile for the same state)
    if pieces[-1].model_extra["layerwise"]["profile"] == whole.model_extra["layerwise"]["profile"]:
        assert streamed == whole.choices[0].message.content
    text_stream = list(client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=4, stream=True))
    assert text_stream[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.UnprocessableEntityError, match="cannot be met"):
        client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=4, extra_body={"max_latency_ms": 0.01})
    native = httpx.post(f"{url}/generate", json={"prompt": "Hello there", "max_new_tokens": 4,
                                                 "min_tokens_per_s": 0.01}, timeout=60).json()
    assert native["objective_ms"] == pytest.approx(4 / 0.01 * 1000) and native["met"] is True
    assert native["latency_ms"] == pytest.approx(native["prefill_ms"] + native["decode_ms"])
    metrics = httpx.get(f"{url}/metrics").json()
    assert metrics["requests"] == 6 and metrics["rejected_objectives"] == 1 and metrics["errors"] == 0
    assert metrics["objectives"] == {"requests": 2, "met": 2, "attainment": 1.0}
    assert sum(level["requests"] for level in metrics["by_load"].values()) == 6
    assert sum(sum(level["profiles"].values()) for level in metrics["by_load"].values()) == 6
    assert metrics["active_profile"] == "none"


def test_slo_training_oracle_and_test_through_the_cli(tmp_path):
    """On tiny-llama: the slo reward needs objectives; the oracle ranks the fixed profiles per load; a trained
    controller is tested on paired requests that carry their objectives and the seed's reward."""
    import json

    from typer.testing import CliRunner

    from layerwise.cli import app

    common = ["--model", "tiny-llama", "--nsamples", "4", "--max-new-tokens", "3", "--train-samples", "12",
              "--profiles", "ffn_neurons@0.5,transformer_layers@0.5"]
    refused = CliRunner().invoke(app, ["runtime", "train", *common, "--reward", "slo"])
    assert refused.exit_code == 2 and "--slo-ms" in refused.output
    unknown = CliRunner().invoke(app, ["runtime", "train", *common, "--reward", "fast", "--slo-ms", "10:100"])
    assert unknown.exit_code == 2 and "reward mode" in unknown.output
    oracle = CliRunner().invoke(app, ["runtime", "oracle", *common, "--out", str(tmp_path / "oracle"), "--samples",
                                      "3", "--load-profile", "idle,spin1", "--slo-ms", "5:200"])
    assert oracle.exit_code == 0, oracle.output
    table = json.loads((tmp_path / "oracle" / "oracle.json").read_text())["table"]
    assert [row["condition"] for row in table] == ["idle", "spin1"]
    assert all(len(row["ranking"]) == 3 and row["best"] == row["ranking"][0][0] for row in table)
    checkpoint = tmp_path / "rt" / "ckpt.pt"
    trained = CliRunner().invoke(app, ["runtime", "train", *common, "--checkpoint", str(checkpoint), "--episodes",
                                       "2", "--steps-per-episode", "3", "--load-profile", "idle", "--reward", "slo",
                                       "--slo-ms", "5:200"])
    assert trained.exit_code == 0, trained.output
    again = tmp_path / "rt" / "seed1.pt"
    retrained = CliRunner().invoke(app, ["runtime", "retrain", "--from", str(checkpoint), "--checkpoint", str(again),
                                         "--seed", "1", "--gamma", "0.3"])
    assert retrained.exit_code == 0, retrained.output
    tested = CliRunner().invoke(app, ["runtime", "test", "--model", "tiny-llama", "--nsamples", "4",
                                      "--max-new-tokens", "3", "--train-samples", "12", "--checkpoint",
                                      str(checkpoint), "--checkpoint", str(again), "--ppl-samples", "3",
                                      "--load-profile", "idle", "--quality-prompts", "2"])
    assert tested.exit_code == 0, tested.output
    records = json.loads((checkpoint.parent / "test.json").read_text())
    assert {r["policy"] for r in records} == {"controller:ckpt", "controller:seed1", "no-learning", "fixed:none",
                                              "fixed:ffn_neurons@0.5", "fixed:transformer_layers@0.5"}
    quality = json.loads((checkpoint.parent / "profile_quality.json").read_text())
    assert set(quality) == {"none", "ffn_neurons@0.5", "transformer_layers@0.5"}
    for record in records:
        assert 5 <= record["objective_ms"] <= 200 and record["met"] == (record["decode_ms"] <= record["objective_ms"])
        assert 0 < record["prefill_ms"] < record["decode_ms"]  # the whole request's first part
        assert record["reward"] == pytest.approx(-record["nll"] if record["met"] else
                                                 -record["nll"] - 8.0 - 2.0 * (record["decode_ms"] / record["objective_ms"] - 1))
        assert math.isfinite(record["seed_reward"])
    controllers = {"controller:ckpt": Controller.load(checkpoint)[0], "controller:seed1": Controller.load(again)[0]}
    assert controllers["controller:seed1"].settings.gamma == 0.3 and controllers["controller:seed1"].settings.seed == 1
    layout = StateLayout(3)
    assert controllers["controller:ckpt"].heads["quality"].inputs == (layout.length,)  # the layout travels along
    ranked = sorted(quality, key=quality.get)
    for record in records:  # each record keeps the state its policy saw: the controllers' choices replay offline
        assert len(record["state"]) == layout.size
        if record["policy"] in controllers:
            controller = controllers[record["policy"]]
            assert controller.actions[controller.act(record["state"], explore=False)] == record["profile"]
        if record["policy"] == "no-learning":  # the best-quality profile predicted to meet the objective
            meeting = [name for name in ranked if record["state"][layout.predicted[controller.actions.index(name)]] <= 0]
            fastest = min(controller.actions, key=lambda n: record["state"][layout.predicted[controller.actions.index(n)]])
            assert record["profile"] == (meeting[0] if meeting else fastest)
    by_prompt = {}
    for record in records:  # paired: every policy saw the same objective for the same prompt
        by_prompt.setdefault(record["prompt"], set()).add(record["objective_ms"])
    assert len(by_prompt) == 3 and all(len(values) == 1 for values in by_prompt.values())


def test_prompts_reach_long_passages_and_the_loads_include_spinning_workers():
    from layerwise.runtime.load import LOAD_CONDITIONS, parse_load_profile
    from layerwise.runtime.prompts import LONG_PASSAGE_WORDS, long_passage_prompts, split_prompts

    passages = long_passage_prompts()
    assert len(passages) >= 20
    assert all(LONG_PASSAGE_WORDS[0] <= len(p.text.split()) <= LONG_PASSAGE_WORDS[1] for p in passages)
    train, test = split_prompts(90, 90)
    assert {p.source for p in test} >= {"wiki", "wiki_long", "arc_easy"} and not set(train) & set(test)
    assert [c.cpu_workers for c in parse_load_profile("idle,spin1,spin2")] == [0, 1, 2]
    with pytest.raises(LayerwiseError, match="spin1"):
        parse_load_profile(" , ")
    assert "spin2" in LOAD_CONDITIONS


def test_counterfactual_training_learns_every_profile_from_each_request(tiny, calibration, tmp_path):
    """``counterfactual``: each training request is served under every profile, and each outcome is a transition
    from the request's one state; the records keep what the controller itself chose. Retraining on that log
    reproduces the controller, or gives another seed's."""
    from layerwise.runtime.load import parse_load_profile
    from layerwise.runtime.profiles import parse_profiles
    from layerwise.runtime.prompts import split_prompts
    from layerwise.runtime.session import RuntimeEnvironment, TrainSettings, retrain, train

    env = RuntimeEnvironment(tiny, calibration, 3, specs=parse_profiles("ffn_neurons@0.5,transformer_layers@0.5"),
                             speed_calibration=FAST_CALIBRATION)
    prompts, _ = split_prompts(8, 0)
    settings = TrainSettings(episodes=2, steps_per_episode=3, conditions=parse_load_profile("idle"), settle_s=0.0,
                             objectives=ObjectiveRange(5, 200), counterfactual=True)
    controller, records = train(env, prompts, settings, RewardSettings(mode="slo"), tmp_path / "ckpt.pt",
                                DqnSettings(gamma=0.0, warmup=4, batch_size=4))
    assert len(records) == 6 and {r["policy"] for r in records} == {"controller"}
    transitions = list(controller.buffer.items)
    assert len(transitions) == 18 and controller.updates > 0
    by_state: dict[tuple, list] = {}
    for transition in transitions:
        by_state.setdefault(tuple(transition.state), []).append(transition)
    assert len(by_state) == 6
    for served, record in zip(by_state.values(), records):
        assert sorted(t.action for t in served) == [0, 1, 2]  # every profile, once, from the same state
        chosen = next(t for t in served if controller.actions[t.action] == record["profile"])
        assert chosen.reward == pytest.approx(record["reward"])
        for transition in served:  # each outcome scored by the slo reward against the request's objective
            assert transition.reward == pytest.approx(sum(transition.terms))
            assert transition.terms[1] == 0.0 or transition.terms[1] <= -8.0
    reloaded, _ = Controller.load(tmp_path / "ckpt.pt")
    assert reloaded.settings.gamma == 0.0 and len(reloaded.buffer) == 18
    # ``retrain`` replays the log in its order: with the online run's seed and discount it gives the same networks,
    # weight for weight (exploration draws from a generator of its own); another seed, other networks from the
    # same data. A log that lost transitions to a full buffer is refused.
    online = controller
    same = retrain(tmp_path / "ckpt.pt", tmp_path / "same.pt", seed=0, gamma=0.0)
    other = retrain(tmp_path / "ckpt.pt", tmp_path / "other.pt", seed=1, gamma=0.5)
    assert same.updates == online.updates > 0
    for name, weight in online.online.state_dict().items():
        assert torch.equal(weight, same.online.state_dict()[name]), name
    assert not torch.equal(online.online.state_dict()["heads.0.0.weight"], other.online.state_dict()["heads.0.0.weight"])
    reloaded, extra = Controller.load(tmp_path / "other.pt")
    assert (reloaded.settings.seed, reloaded.settings.gamma) == (1, 0.5) and len(extra["records"]) == 6
    short = Controller(online.state_size, online.actions, DqnSettings(buffer_size=4), online.heads)
    for transition in list(online.buffer.items)[:6]:
        short.buffer.add(transition)
        short.steps += 1
    short.save(tmp_path / "short.pt")
    with pytest.raises(LayerwiseError, match="kept 4 of the 6 transitions"):
        retrain(tmp_path / "short.pt", tmp_path / "never.pt", seed=0, gamma=0.0)


def _spy_on_serving(env) -> tuple[list[str], list[list[float]]]:
    """Record each profile ``env`` serves and its running (prefill, decoding) slowdowns after each fold."""
    served, folded = [], []
    serve, observe = env.serve, env.speeds.observe

    def serving(prompt, profile, **options):
        served.append(profile)
        return serve(prompt, profile, **options)

    def observing(*args):
        observe(*args)
        folded.append([env.speeds.prefill_slowdown, env.speeds.decode_slowdown])

    env.serve, env.speeds.observe = serving, observing
    return served, folded


def test_training_warms_the_slowdowns_to_each_new_load_before_its_first_state(tiny, calibration, tmp_path):
    """After each episode's load starts, ``warm_requests`` dense requests, unrecorded, move the running slowdowns
    to the load now: the first state no longer carries the last load's slowdown, and nothing of the warm-up is
    recorded or learned from."""
    from layerwise.runtime.load import parse_load_profile
    from layerwise.runtime.profiles import parse_profiles
    from layerwise.runtime.prompts import split_prompts
    from layerwise.runtime.session import RuntimeEnvironment, TrainSettings, train

    prompts, _ = split_prompts(8, 0)
    first_states = {}
    for warm in (0, 3):
        env = RuntimeEnvironment(tiny, calibration, 3, specs=parse_profiles("ffn_neurons@0.5"),
                                 speed_calibration=FAST_CALIBRATION)
        served, folded = _spy_on_serving(env)
        env.speeds.prefill_slowdown = env.speeds.decode_slowdown = 50.0  # as if the last load were far slower
        settings = TrainSettings(episodes=1, steps_per_episode=2, conditions=parse_load_profile("idle"),
                                 settle_s=0.0, objectives=ObjectiveRange(5, 200), counterfactual=True,
                                 warm_requests=warm)
        controller, records = train(env, prompts, settings, RewardSettings(mode="slo"), tmp_path / f"{warm}.pt",
                                    DqnSettings(gamma=0.0, warmup=2, batch_size=2))
        assert len(records) == 2 and len(controller.buffer) == 4  # 2 requests under both profiles; no warm-up
        assert len(served) == warm + 4 and served[:warm] == ["none"] * warm
        first_states[warm] = [records[0]["state"][i] for i in env.layout.slowdowns]
        if warm:  # the first state is observed after the warm-up's last fold, before any request it records
            assert first_states[warm] == pytest.approx([math.log(v) for v in folded[warm - 1]])
        assert Controller.load(tmp_path / f"{warm}.pt")[1]["warm_requests"] == warm
    assert first_states[0] == pytest.approx([math.log(50.0)] * 2)  # the stale slowdowns, untouched
    assert first_states[3] != pytest.approx(first_states[0])


def test_prompt_features_read_a_fixed_opening_of_long_prompts():
    """The reading ease is estimated on the prompt's opening, so a passage's cost is bounded: what follows the
    opening does not change it."""
    from layerwise.runtime.features import READ_WORDS, PromptFeaturizer

    featurizer = PromptFeaturizer()
    opening = " ".join(["The cat sat on the mat."] * (READ_WORDS // 6 + 1))
    tail = " Notwithstanding extraordinarily incomprehensible considerations, " * 200
    plain, padded = featurizer(opening, 100), featurizer(opening + tail, 100)
    assert plain == padded
    assert featurizer(tail, 100) != plain  # the tail alone reads differently: the opening is what decided


def test_paired_comparison_rotates_which_policy_serves_a_prompt_first(tiny, calibration):
    from layerwise.runtime.load import parse_load_profile
    from layerwise.runtime.profiles import parse_profiles
    from layerwise.runtime.prompts import split_prompts
    from layerwise.runtime.session import RuntimeEnvironment, compare, fixed_policies

    env = RuntimeEnvironment(tiny, calibration, 2, specs=parse_profiles("ffn_neurons@0.5,transformer_layers@0.5"),
                             speed_calibration=FAST_CALIBRATION)
    policies = fixed_policies(env)
    prompts, _ = split_prompts(4, 0)
    records = compare(env, policies, prompts, parse_load_profile("idle"), RewardSettings(), settle_s=0.0)
    names = list(policies)
    for index in range(4):
        served = [r["policy"] for r in records if r["prompt"] == index]
        assert served == names[index % 3:] + names[: index % 3]  # each policy goes first in turn
    assert all(p.text in env.references for p in prompts)
