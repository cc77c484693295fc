"""Double DQN controller, observation features and machine load: replay buffer, target sync, the double-Q
target, checkpoint resume, learning a contextual choice; feature vectors; load workers always stopped."""

from __future__ import annotations

import math
import random

import psutil
import pytest
import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.runtime.controller import Controller, DqnSettings, Head, ReplayBuffer, Transition, double_dqn_targets


def _transition(i: int) -> Transition:
    return Transition([float(i), 0.0], i % 3, float(i), [float(i + 1), 0.0], False)


def test_replay_buffer_keeps_the_last_transitions_and_samples_reproducibly():
    buffer = ReplayBuffer(5, seed=1)
    for i in range(8):
        buffer.add(_transition(i))
    assert len(buffer) == 5 and [t.reward for t in buffer.items] == [3.0, 4.0, 5.0, 6.0, 7.0]
    again = ReplayBuffer(5, seed=1)
    for i in range(8):
        again.add(_transition(i))
    assert [t.reward for t in buffer.sample(3)] == [t.reward for t in again.sample(3)]


def test_double_dqn_target_values_the_online_argmax_with_the_target_net():
    online, target = nn.Linear(2, 3, bias=False), nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))  # picks action 1
        target.weight.copy_(torch.tensor([[5.0, 0.0], [2.0, 0.0], [9.0, 0.0]]))  # would pick action 2
    next_states = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    y = double_dqn_targets(online, target, torch.tensor([1.0, 1.0]), next_states, torch.tensor([0.0, 1.0]), 0.5)
    assert y.tolist() == [1.0 + 0.5 * 2.0, 1.0]  # Q_target(s', 1) = 2, not max_a Q_target = 9; done: reward only


class _FixedHeads(nn.Module):
    """Q-values that ignore the state: ``[heads, actions]``, summed with unit scales."""

    def __init__(self, values: list[list[float]]) -> None:
        super().__init__()
        self.values = torch.tensor(values)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.values.expand(len(states), -1, -1)

    def total(self, states: torch.Tensor) -> torch.Tensor:
        return self(states).sum(dim=1)


def test_double_dqn_targets_per_head_follow_the_argmax_of_the_total():
    online = _FixedHeads([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])  # head 0 alone would pick 1; the total picks 2
    target = _FixedHeads([[5.0, 2.0, 9.0], [1.0, 1.0, 7.0]])
    y = double_dqn_targets(online, target, torch.tensor([[1.0, 2.0], [1.0, 2.0]]), torch.zeros(2, 4),
                           torch.tensor([0.0, 1.0]), 0.5)
    assert y.tolist() == [[1.0 + 0.5 * 9.0, 2.0 + 0.5 * 7.0], [1.0, 2.0]]


def test_decomposed_heads_see_only_their_inputs_and_sum_in_reward_units():
    from layerwise.runtime.controller import DecomposedQ, Head

    net = DecomposedQ(3, 2, 8, [Head(), Head((2,))])
    net.scales.copy_(torch.tensor([2.0, 0.5]))
    states = torch.rand(4, 3)
    moved = states.clone()
    moved[:, :2] += 1.0  # the telemetry-like part changes, the second head's input does not
    values, shifted = net(states), net(moved)
    assert values.shape == (4, 2, 2)
    assert torch.equal(values[:, 1], shifted[:, 1]) and not torch.equal(values[:, 0], shifted[:, 0])
    assert torch.allclose(net.total(states), 2.0 * values[:, 0] + 0.5 * values[:, 1])
    with pytest.raises(ValueError, match="not indices"):
        DecomposedQ(3, 2, 8, [Head((3,))])


def test_controller_with_reward_heads_learns_the_quality_trade_off_and_resumes(tmp_path):
    """Pruning earns +1 of speed always and costs 2 of quality on 'hard' prompts (second feature high), 0.5 on
    easy ones; the first feature is noise standing for the load. Greedy choices must follow the prompt."""
    settings = DqnSettings(gamma=0.0, epsilon_decay_steps=300, warmup=32, target_sync=20, learning_rate=3e-3)
    heads = {"speed": Head(), "quality": Head((1,))}
    controller = Controller(2, ["dense", "pruned"], settings, heads)
    rng = random.Random(1)
    state = [rng.random(), rng.random()]
    for _ in range(600):
        action = controller.act(state)
        terms = [1.0 + 0.1 * rng.random(), -(2.0 if state[1] > 0.5 else 0.5)] if action == 1 else [0.0, 0.0]
        following = [rng.random(), rng.random()]
        controller.observe(Transition(state, action, sum(terms), following, False, terms))
        state = following
    choices = [controller.act([load, x / 10 + 0.05], explore=False) for load in (0.1, 0.9) for x in range(10)]
    assert choices[:4] == [1] * 4 and choices[6:10] == [0] * 4 and choices[10:14] == [1] * 4
    assert len(controller.reward_center) == 2
    controller.save(tmp_path / "ckpt.pt")
    resumed, _ = Controller.load(tmp_path / "ckpt.pt")
    assert resumed.heads == heads
    assert resumed.q_values([0.5, 0.9]) == controller.q_values([0.5, 0.9])
    with pytest.raises(ValueError, match="without reward terms"):
        resumed.learn([Transition([0.0, 0.0], 0, 1.0, [0.0, 0.0], False)])
    torch.save({**controller.state_dict(), "format": "layerwise.controller/1"}, tmp_path / "old.pt")
    with pytest.raises(LayerwiseError, match="older layerwise"):
        Controller.load(tmp_path / "old.pt")


def test_target_network_syncs_every_n_updates():
    controller = Controller(2, ["a", "b", "c"], DqnSettings(target_sync=3, warmup=4, batch_size=4, gradient_steps=1))
    for i in range(4):
        controller.observe(_transition(i))  # the 4th fills the warm-up: update 1
    assert controller.updates == 1
    differs = lambda: any(not torch.equal(p, q) for p, q in zip(controller.online.parameters(),  # noqa: E731
                                                                 controller.target.parameters()))
    assert differs()
    controller.observe(_transition(4))
    controller.observe(_transition(5))  # update 3: synced
    assert controller.updates == 3 and not differs()
    controller.observe(_transition(6))
    assert differs()


def test_rewards_are_standardised_robustly_from_the_warm_up_and_each_request_takes_several_steps():
    controller = Controller(2, ["a", "b"], DqnSettings(warmup=5, batch_size=4, gradient_steps=3))
    rewards = [10.0, 12.0, 14.0, 16.0, -400.0]  # one catastrophic profile must not set the scale
    for i, reward in enumerate(rewards):
        controller.observe(Transition([0.1 * i, 0.0], i % 2, reward, [0.0, 0.0], False))
    assert controller.reward_center == [12.0]  # the median
    assert controller.reward_scale == pytest.approx([1.4826 * 2.0])  # MAD of |r − 12| = [2, 0, 2, 4, 412] is 2
    assert controller.online.scales.tolist() == pytest.approx([1.4826 * 2.0])  # Q back in reward units
    assert controller.updates == 3
    controller.observe(Transition([0.0, 0.0], 0, 11.0, [0.0, 0.0], False))
    assert controller.updates == 6 and controller.reward_center == [12.0]  # frozen after the warm-up


def test_controller_learns_a_state_dependent_choice_and_resumes_exactly(tmp_path):
    """Reward 1 for action 0 when the first feature is high, for action 1 when it is low (a contextual
    choice like 'prune harder under load'); after training the greedy choices follow the state."""
    settings = DqnSettings(gamma=0.0, epsilon_decay_steps=300, warmup=32, target_sync=20, learning_rate=3e-3)
    controller = Controller(2, ["dense", "pruned"], settings)
    rng = random.Random(0)
    state = [rng.random(), rng.random()]
    for _ in range(600):
        action = controller.act(state)
        reward = 1.0 if action == (0 if state[0] > 0.5 else 1) else 0.0
        following = [rng.random(), rng.random()]
        controller.observe(Transition(state, action, reward, following, False))
        state = following
    probes = [[x / 10 + 0.05, 0.5] for x in range(10)]
    choices = [controller.act(p, explore=False) for p in probes]
    assert choices[:4] == [1] * 4 and choices[-4:] == [0] * 4
    assert controller.epsilon == pytest.approx(settings.epsilon_end)
    controller.save(tmp_path / "ckpt.pt", {"episode": 7})
    resumed, extra = Controller.load(tmp_path / "ckpt.pt")
    assert extra == {"episode": 7} and resumed.steps == controller.steps and len(resumed.buffer) == len(controller.buffer)
    transition = Transition([0.9, 0.1], 0, 1.0, [0.2, 0.3], False)
    assert resumed.act([0.3, 0.3]) == controller.act([0.3, 0.3])  # same exploration stream
    assert resumed.observe(transition) == pytest.approx(controller.observe(transition))  # same sample, same step


def test_prompt_features_are_normalised_and_read_length_questions_and_difficulty():
    from layerwise.runtime.features import PROMPT_FEATURES, PromptFeaturizer, flesch_reading_ease

    easy, hard = "Is the cat on the mat?", ("Notwithstanding considerable methodological heterogeneity, "
                                             "epidemiological investigations consistently demonstrate associations.")
    assert flesch_reading_ease(easy) > flesch_reading_ease(hard)
    featurizer = PromptFeaturizer()
    simple, dense = dict(zip(PROMPT_FEATURES, featurizer(easy))), dict(zip(PROMPT_FEATURES, featurizer(hard)))
    assert simple["question"] == 1.0 and dense["question"] == 0.0 and 0 < simple["length"] < dense["length"] < 1
    assert dense["difficulty"] > simple["difficulty"] and dense["word_length"] > simple["word_length"]
    assert featurizer(easy, tokens=2047)[0] == pytest.approx(1.0, abs=1e-3)  # log(1 + tokens) / log(2049)
    assert all(0.0 <= v <= 1.5 for v in featurizer(hard))


def test_telemetry_vector_is_bounded():
    from layerwise.runtime.telemetry import TELEMETRY_FEATURES, Telemetry

    reading = Telemetry().read()
    assert list(reading) == list(TELEMETRY_FEATURES)
    assert all(0.0 <= value <= 2.0 for value in reading.values())
    assert 0 < reading["memory_available"] <= 1 and 0 < reading["process_rss"] < 1


def test_telemetry_cpu_counts_other_processes_not_our_own_work():
    import time

    from layerwise.runtime.load import LoadCondition, MachineLoad
    from layerwise.runtime.telemetry import Telemetry

    telemetry = Telemetry()
    start = time.perf_counter()
    while time.perf_counter() - start < 0.5:  # this process busy: not "other load"
        pass
    own = telemetry.external_cpu()
    with MachineLoad(LoadCondition("busy", cpu_workers=1, duty=1.0)) as load:  # returns once it spins
        worker = psutil.Process(load.workers[0].pid)
        spun = sum(worker.cpu_times()[:2])
        telemetry.external_cpu()
        time.sleep(1.0)
        loaded = telemetry.external_cpu()
        spun = sum(worker.cpu_times()[:2]) - spun
    assert spun > 0.5, f"the load worker ran {spun:.2f} s of the 1 s window"
    # one more core spinning than during our own busy loop (other work on the machine shows in both)
    assert loaded - own >= 0.3 / psutil.cpu_count()
    # a benchmark's subprocesses are its own work when it says so: the same worker reads as load only otherwise
    mine, others = Telemetry(children_are_own=True), Telemetry()
    with MachineLoad(LoadCondition("busy", cpu_workers=1, duty=1.0)):
        mine.external_cpu(), others.external_cpu()
        time.sleep(1.0)
        as_own, as_other = mine.external_cpu(), others.external_cpu()
    assert as_other - as_own >= 0.3 / psutil.cpu_count()


def test_machine_load_workers_run_and_always_stop():
    from layerwise.runtime.load import LoadCondition, MachineLoad, parse_load_profile

    assert [c.name for c in parse_load_profile("idle,cpu,memory,mixed")] == ["idle", "cpu", "memory", "mixed"]
    with pytest.raises(LayerwiseError, match="Unknown load condition"):
        parse_load_profile("cpu,gpu")
    condition = LoadCondition("test", cpu_workers=1, duty=0.5, memory_fraction=0.001, memory_cap_gib=0.01)
    with pytest.raises(KeyboardInterrupt):
        with MachineLoad(condition) as load:
            pids = [w.pid for w in load.workers]
            assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
            raise KeyboardInterrupt
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_machine_load_says_when_a_worker_cannot_put_its_load_on():
    from layerwise.runtime.load import LoadCondition, MachineLoad

    impossible = LoadCondition("test", memory_fraction=1.0, memory_cap_gib=-1.0)  # a negative ballast size
    with pytest.raises(LayerwiseError, match="A hold load worker exited with code 1 before its load was on"):
        with MachineLoad(impossible):
            pass


def test_runtime_train_resumes_and_test_compares_policies(tmp_path):
    """Through the CLI on tiny-llama: train 2 episodes, resume to 3, then test against the fixed profiles."""
    import json

    from typer.testing import CliRunner

    from layerwise.cli import app

    checkpoint = tmp_path / "rt" / "ckpt.pt"
    common = ["--model", "tiny-llama", "--checkpoint", str(checkpoint), "--load-profile", "idle", "--nsamples", "4"]
    first = CliRunner().invoke(app, ["runtime", "train", *common, "--episodes", "2", "--steps-per-episode", "3",
                                     "--train-samples", "12", "--max-new-tokens", "4"])
    assert first.exit_code == 0, first.output
    resumed = CliRunner().invoke(app, ["runtime", "train", *common, "--episodes", "3", "--steps-per-episode", "3",
                                       "--train-samples", "12", "--max-new-tokens", "4", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    state = torch.load(checkpoint, weights_only=False)
    assert state["extra"]["episode"] == 3 and len(state["extra"]["records"]) == 9 and state["steps"] == 9
    assert {p.name for p in (checkpoint.parent / "plots").iterdir()} == {
        "reward.png", "epsilon.png", "actions.png", "speed_quality.png", "conditions.png"}
    tested = CliRunner().invoke(app, ["runtime", "test", *common, "--ppl-samples", "2", "--train-samples", "12",
                                      "--max-new-tokens", "4", "--lm-eval", "--tasks", "arc_easy", "--limit", "4",
                                      "--quality-prompts", "0"])
    assert tested.exit_code == 0, tested.output
    records = json.loads((checkpoint.parent / "test.json").read_text())
    policies = {r["policy"] for r in records}  # --quality-prompts 0: no no-learning rule
    assert "controller" in policies and "fixed:none" in policies and len(policies) == 1 + len(state["actions"])
    assert all(r["tokens_per_s"] > 0 and r["ppl"] > 1 for r in records)
    scores = json.loads((checkpoint.parent / "test_zeroshot.json").read_text())
    chosen = {r["profile"] for r in records if r["policy"] == "controller"}
    assert set(scores) == chosen | {"none"} and all(s["scores"]["arc_easy"]["items"] == 4 for s in scores.values())
    assert "Zero-shot accuracy of the controllers' profiles" in (checkpoint.parent / "test_report.md").read_text()
    unknown = CliRunner().invoke(app, ["runtime", "test", *common, "--lm-eval", "--tasks", "arc_hard"])
    assert unknown.exit_code == 2 and "arc_hard" in unknown.output
    missing = CliRunner().invoke(app, ["runtime", "test", "--model", "tiny-llama", "--checkpoint",
                                       str(tmp_path / "none.pt")])
    assert missing.exit_code == 2 and "No controller checkpoint" in missing.output


def test_server_generates_reports_metrics_and_rejects_bad_requests(tiny, calibration, monkeypatch):
    from fastapi.testclient import TestClient

    from layerwise.runtime.server import create_app
    from layerwise.runtime.session import RuntimeEnvironment

    env = RuntimeEnvironment(tiny, calibration, 0)
    controller = Controller(env.state_size, env.profiles.names, DqnSettings(seed=3))
    with torch.no_grad():
        dense = tiny.model(torch.tensor([[5, 6, 7]])).logits
    client = TestClient(create_app(env, controller))
    response = client.post("/generate", json={"prompt": "Which gas do plants absorb?", "max_new_tokens": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["profile"] in env.profiles.names and 1 <= body["new_tokens"] <= 5 and body["tokens_per_s"] > 0
    for bad in ({"prompt": "", "max_new_tokens": 5}, {"prompt": "hi", "max_new_tokens": 0}, {"max_new_tokens": 3}):
        assert client.post("/generate", json=bad).status_code == 422
    metrics = client.get("/metrics").json()
    assert metrics["requests"] == 1 and metrics["profiles"] == {body["profile"]: 1}
    assert metrics["active_profile"] == "none"
    factors = metrics["profile_factors"]  # the served profile's timing error learned, the rest renormalised
    assert set(factors) == set(env.profiles.names) and math.prod(factors.values()) == pytest.approx(1.0)
    assert factors[body["profile"]] != pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        assert torch.equal(tiny.model(torch.tensor([[5, 6, 7]])).logits, dense)  # never left pruned
    # a failing generation under a pruned profile: 500, counted, model dense again
    monkeypatch.setattr(controller, "act", lambda state, explore=False: env.profiles.names.index("ffn_neurons@0.5"))

    class Broken:
        def __init__(self, *args, **kwargs):
            assert env.profiles.active.name == "ffn_neurons@0.5"

        def __iter__(self):
            raise RuntimeError("out of memory")

    monkeypatch.setattr("layerwise.runtime.session.TokenStream", Broken)
    failed = client.post("/generate", json={"prompt": "hello", "max_new_tokens": 2})
    assert failed.status_code == 500 and "out of memory" in failed.json()["detail"]
    assert client.get("/metrics").json()["errors"] == 1 and env.profiles.active.name == "none"
    with torch.no_grad():
        assert torch.equal(tiny.model(torch.tensor([[5, 6, 7]])).logits, dense)


def test_load_workers_stop_themselves_when_their_parent_is_killed(tmp_path):
    """SIGKILL gives MachineLoad no chance to clean up: the workers must notice and exit on their own."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import time\n"
        "from layerwise.runtime.load import LoadCondition, MachineLoad\n"
        "if __name__ == '__main__':\n"
        "    with MachineLoad(LoadCondition('t', cpu_workers=1, duty=0.2, memory_fraction=0.001,"
        " memory_cap_gib=0.01)) as load:\n"
        "        print(*[w.pid for w in load.workers], flush=True)\n"
        "        time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    alive = lambda p: psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE  # noqa: E731
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)
