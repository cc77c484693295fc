"""Where each feature group sits in the controller's state, and what each reward term's head reads."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.runtime.controller import DecomposedQ
from layerwise.runtime.features import PROMPT_FEATURES
from layerwise.runtime.heads import StateLayout, reward_heads
from layerwise.runtime.objectives import SpeedCalibration
from layerwise.runtime.prompts import Prompt

FAST_CALIBRATION = SpeedCalibration(short=8, long=64, new_tokens=3, repeats=1)


def test_state_layout_locates_every_feature_group_in_an_observed_state(tiny, calibration):
    from layerwise.runtime.profiles import parse_profiles
    from layerwise.runtime.session import RuntimeEnvironment

    env = RuntimeEnvironment(tiny, calibration, 3, specs=parse_profiles("ffn_neurons@0.5,transformer_layers@0.5"),
                             speed_calibration=FAST_CALIBRATION)
    env.speeds.prefill_slowdown, env.speeds.decode_slowdown = 1.7, 1.2
    prompt = Prompt("arc_easy", "Which gas do plants absorb from the air?")
    state = env.observe(prompt, 300.0)
    layout = StateLayout(len(env.profiles.names))
    assert layout.size == len(state) == env.state_size
    tokens = env.tokenize(prompt)[1]
    assert state[layout.length] == pytest.approx(env.featurizer(prompt.text, tokens)[PROMPT_FEATURES.index("length")])
    assert state[layout.objective[0]] == pytest.approx(math.log(300.0 / 1000.0))
    assert [state[i] for i in layout.slowdowns] == pytest.approx([math.log(1.7), math.log(1.2)])
    expected = [math.log(env.speeds.predict(name, tokens, 3) / 300.0) for name in env.profiles.names]
    assert [state[i] for i in layout.predicted] == pytest.approx([max(-2.0, min(2.0, r)) for r in expected])


def test_heads_read_the_length_and_the_predicted_latencies_only():
    layout = StateLayout(3)
    heads = reward_heads(layout, "slo")
    assert list(heads) == ["quality", "objective"]  # the order of the slo reward's terms
    assert heads["quality"].inputs == (layout.length,)
    assert heads["objective"].inputs == (layout.length, *layout.slowdowns)
    assert heads["objective"].per_action == layout.predicted
    assert list(reward_heads(layout, "linear")) == ["speed", "quality"]  # the seed's terms
    assert reward_heads(layout, "linear")["speed"] == heads["objective"]
    torch.manual_seed(0)
    network = DecomposedQ(layout.size, 3, 16, list(heads.values()))
    states = torch.randn(4, layout.size)
    unread = states.clone()
    unread[:, list(layout.telemetry)] += 5.0  # the load reaches the heads through the slowdowns only
    unread[:, [i for i in layout.prompt if i != layout.length]] += 5.0
    assert torch.equal(network.total(states), network.total(unread))
    read = states.clone()
    read[:, layout.predicted[1]] += 1.0  # profile 1 predicted slower: its penalty changes
    assert not torch.equal(network.total(states)[:, 1], network.total(read)[:, 1])
