"""Double DQN controller: picks a runtime profile per request from the telemetry and prompt features.

A small torch implementation (the action set and the one-request steps are ours; stable-baselines3's DQN
has no double-Q target): online and target Q-networks, a replay buffer, ε-greedy exploration with linear
decay, Huber loss, a periodic hard target sync, and the Double-DQN target
``y = r + γ · (1 − done) · Q_target(s', argmax_a Q_online(s', a))``.

The reward may be decomposed into terms (speed and quality), each learned by its own head that sees only the
part of the state its term depends on (the Hybrid Reward Architecture of van Seijen et al., 2017): the
quality of a profile does not depend on the machine's load, so its head pools the evidence of every load
instead of learning it once per load from noisy totals. Q is the heads' sum in reward units, and every head's
bootstrap follows that sum's argmax, so the decomposition changes what is learned, not what is maximised.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import atomic_torch_save
from ..errors import LayerwiseError

FORMAT = "layerwise.controller/5"  # 5: one head layout, no spaCy tags in the state


@dataclass
class DqnSettings:
    """Hyper-parameters of the controller (saved in its checkpoint)."""

    hidden: int = 64
    gamma: float = 0.3
    learning_rate: float = 1e-3
    batch_size: int = 32
    buffer_size: int = 5000
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    epsilon_decay_steps: int = 400
    target_sync: int = 50  # in gradient steps
    warmup: int = 32
    gradient_steps: int = 4  # per request: a request costs a second of decoding, an update a millisecond
    standardize_rewards: bool = True  # by the warm-up rewards' median and MAD, then frozen
    huber_delta: float = 10.0  # in standardised units: quadratic (a mean) over the spread of useful profiles,
    # linear (bounded gradients) only for catastrophes; at 1 MAD, Q leans to the median and misses the
    # heavy perplexity tails that separate, e.g., ffn_neurons@0.5 from transformer_layers@0.3
    seed: int = 0


@dataclass
class Transition:
    state: list[float]
    action: int
    reward: float
    next_state: list[float]
    done: bool
    terms: list[float] | None = None  # the reward's terms, one per head (None: one head, the reward)

    def head_rewards(self, heads: int) -> list[float]:
        if self.terms is None:
            if heads != 1:
                raise ValueError(f"A transition without reward terms cannot train {heads} heads.")
            return [self.reward]
        if len(self.terms) != heads:
            raise ValueError(f"{len(self.terms)} reward terms for {heads} heads.")
        return list(self.terms)


class ReplayBuffer:
    """The last ``capacity`` transitions; uniform sampling with its own seeded generator."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.items: deque[Transition] = deque(maxlen=capacity)
        self.random = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, transition: Transition) -> None:
        self.items.append(transition)

    def sample(self, size: int) -> list[Transition]:
        return self.random.sample(list(self.items), size)


def q_network(inputs: int, actions: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, actions))


@dataclass(frozen=True)
class Head:
    """One reward term's Q-head: the state features it sees (None: all), and optionally one state feature per
    action that only that action's value reads (``PerActionQNetwork``)."""

    inputs: tuple[int, ...] | None = None
    per_action: tuple[int, ...] | None = None


class PerActionQNetwork(nn.Module):
    """``Q(s, a) = f(shared(s), x_a, onehot(a))``: one network scores every action from the shared features,
    the action's own feature ``x_a`` (its predicted latency over the objective) and which action it is. What a
    request teaches about "a profile predicted at 1.3× the objective misses it" then holds for every profile,
    instead of being learned once per output of a plain Q-network."""

    def __init__(self, inputs: int, actions: int, hidden: int) -> None:
        super().__init__()
        self.actions = actions
        self.shared = inputs - actions
        self.body = q_network(self.shared + 1 + actions, 1, hidden)
        self.register_buffer("identity", torch.eye(actions))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        batch = states.shape[0]
        shared = states[:, : self.shared, None].expand(batch, self.shared, self.actions).transpose(1, 2)
        own = states[:, self.shared :, None]
        which = self.identity[None].expand(batch, self.actions, self.actions)
        return self.body(torch.cat([shared, own, which], dim=2)).squeeze(2)


class DecomposedQ(nn.Module):
    """One Q-network per reward term, each on its slice of the state; ``forward`` gives the heads' values
    ``[batch, heads, actions]`` in standardised units, ``total`` their sum in reward units (``scales``)."""

    def __init__(self, state_size: int, actions: int, hidden: int, heads: list[Head]) -> None:
        super().__init__()
        self.inputs = [(list(range(state_size)) if head.inputs is None else list(head.inputs))
                       + list(head.per_action or ()) for head in heads]
        for head, chosen in zip(heads, self.inputs):
            if not chosen or min(chosen) < 0 or max(chosen) >= state_size:
                raise ValueError(f"A reward head's inputs {chosen} are not indices of a {state_size}-feature state.")
            if head.per_action is not None and len(head.per_action) != actions:
                raise ValueError(f"A per-action head needs one feature per action ({actions}), "
                                 f"got {len(head.per_action)}.")
        self.heads = nn.ModuleList((PerActionQNetwork if head.per_action is not None else q_network)(
            len(chosen), actions, hidden) for head, chosen in zip(heads, self.inputs))
        self.register_buffer("scales", torch.ones(len(self.inputs)))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(states[:, chosen]) for head, chosen in zip(self.heads, self.inputs)], dim=1)

    def total(self, states: torch.Tensor) -> torch.Tensor:
        return (self(states) * self.scales[None, :, None]).sum(dim=1)


def double_dqn_targets(online: nn.Module, target: nn.Module, rewards: torch.Tensor, next_states: torch.Tensor,
                       done: torch.Tensor, gamma: float) -> torch.Tensor:
    """r + γ·(1 − done)·Q_target(s', argmax_a Q_online(s', a)): the online net picks, the target net values.

    Plain networks give ``[batch, actions]`` and rewards ``[batch]``; a ``DecomposedQ`` gives one value per head
    (rewards ``[batch, heads]``), and the argmax is taken over the online net's total, the same for every head."""
    with torch.no_grad():
        best = getattr(online, "total", online)(next_states).argmax(dim=1)
        values = target(next_states)
        index = best.view(-1, *([1] * (values.dim() - 1))).expand(*values.shape[:-1], 1)
        values = values.gather(-1, index).squeeze(-1)
    not_done = (1.0 - done).view(-1, *([1] * (rewards.dim() - 1)))
    return rewards + gamma * not_done * values


@dataclass
class Controller:
    """The profile-picking agent: ``act`` (ε-greedy or greedy), ``observe`` (store and learn), save/load."""

    state_size: int
    actions: list[str]
    settings: DqnSettings = field(default_factory=DqnSettings)
    heads: dict[str, Head] = field(default_factory=lambda: {"reward": Head()})  # one per reward term
    steps: int = 0
    updates: int = 0
    reward_center: list[float] | None = None  # per head, set from the warm-up rewards
    reward_scale: list[float] | None = None

    def __post_init__(self) -> None:
        torch.manual_seed(self.settings.seed)
        build = lambda: DecomposedQ(self.state_size, len(self.actions), self.settings.hidden,  # noqa: E731
                                    list(self.heads.values()))
        self.online, self.target = build(), build()
        if self.reward_scale is not None:
            self._set_scales()
        self.target.load_state_dict(self.online.state_dict())
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=self.settings.learning_rate)
        self.buffer = ReplayBuffer(self.settings.buffer_size, self.settings.seed)
        self.random = random.Random(self.settings.seed)
        self.losses: list[float] = []

    @property
    def epsilon(self) -> float:
        s = self.settings
        fraction = min(1.0, self.steps / max(1, s.epsilon_decay_steps))
        return s.epsilon_start + fraction * (s.epsilon_end - s.epsilon_start)

    def q_values(self, state: list[float]) -> list[float]:
        """Q(state, a) for every action, in reward units up to a constant (the heads' centres)."""
        with torch.no_grad():
            return self.online.total(torch.tensor([state], dtype=torch.float32))[0].tolist()

    def act(self, state: list[float], explore: bool = True) -> int:
        """An action index: random with probability ε while exploring, else the online net's argmax."""
        if explore and self.random.random() < self.epsilon:
            return self.random.randrange(len(self.actions))
        values = self.q_values(state)
        return max(range(len(values)), key=values.__getitem__)

    def observe(self, transition: Transition) -> float | None:
        """Store a transition, take ``gradient_steps`` steps once the buffer is warm; returns the last loss."""
        self.buffer.add(transition)
        self.steps += 1
        if len(self.buffer) < max(self.settings.warmup, self.settings.batch_size):
            return None
        if self.reward_scale is None:
            self.fit_reward_scale()
        loss = None
        for _ in range(self.settings.gradient_steps):
            loss = self.learn(self.buffer.sample(self.settings.batch_size))
        return loss

    def fit_reward_scale(self) -> None:
        """Each head learns ``(r − median) / (1.4826 · MAD)`` of its warm-up rewards: raw rewards lie far from the
        networks' initial outputs (tens of tokens/s), and a robust scale keeps a few catastrophic profiles from
        squashing the differences between the good ones. The scales weigh the heads back into reward units."""
        heads = len(self.heads)
        if not self.settings.standardize_rewards:
            self.reward_center, self.reward_scale = [0.0] * heads, [1.0] * heads
        else:
            rewards = torch.tensor([t.head_rewards(heads) for t in self.buffer.items], dtype=torch.float64)
            center = rewards.median(dim=0).values
            spread = 1.4826 * (rewards - center).abs().median(dim=0).values
            self.reward_center = center.tolist()
            self.reward_scale = [s if s > 1e-9 else 1.0 for s in spread.tolist()]
        self._set_scales()

    def _set_scales(self) -> None:
        for net in (self.online, self.target):
            net.scales.copy_(torch.tensor(self.reward_scale))

    def learn(self, batch: list[Transition]) -> float:
        heads = len(self.heads)
        states = torch.tensor([t.state for t in batch], dtype=torch.float32)
        actions = torch.tensor([t.action for t in batch])
        rewards = torch.tensor([t.head_rewards(heads) for t in batch], dtype=torch.float32)
        rewards = (rewards - torch.tensor(self.reward_center)) / torch.tensor(self.reward_scale)
        next_states = torch.tensor([t.next_state for t in batch], dtype=torch.float32)
        done = torch.tensor([float(t.done) for t in batch])
        targets = double_dqn_targets(self.online, self.target, rewards, next_states, done, self.settings.gamma)
        predicted = self.online(states).gather(2, actions.view(-1, 1, 1).expand(-1, heads, 1)).squeeze(2)
        loss = nn.functional.huber_loss(predicted, targets, delta=self.settings.huber_delta)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        if self.updates % self.settings.target_sync == 0:
            self.sync_target()
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def sync_target(self) -> None:
        self.target.load_state_dict(self.online.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "state_size": self.state_size, "actions": self.actions,
                "heads": {name: asdict(head) for name, head in self.heads.items()},
                "settings": asdict(self.settings), "steps": self.steps, "updates": self.updates,
                "reward_center": self.reward_center, "reward_scale": self.reward_scale,
                "online": self.online.state_dict(), "target": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict(), "buffer": [asdict(t) for t in self.buffer.items],
                "random": self.random.getstate(), "buffer_random": self.buffer.random.getstate()}

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({**self.state_dict(), "extra": extra or {}}, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> tuple["Controller", dict[str, Any]]:
        """A controller exactly as saved (networks, optimizer, buffer, exploration state), and the extra data."""
        try:
            state = torch.load(Path(path), weights_only=False)
        except FileNotFoundError:
            raise LayerwiseError(f"No controller checkpoint at {path}.") from None
        if not isinstance(state, dict) or not str(state.get("format", "")).startswith("layerwise.controller/"):
            raise LayerwiseError(f"{path} is not a layerwise controller checkpoint.")
        if state["format"] != FORMAT:
            raise LayerwiseError(f"{path} is a controller checkpoint of an older layerwise ({state['format']}); "
                                 "train it again.")
        controller = cls(state["state_size"], state["actions"], DqnSettings(**state["settings"]),
                         {name: Head(**{k: tuple(v) if isinstance(v, list) else v for k, v in head.items()})
                          for name, head in state["heads"].items()},
                         state["steps"], state["updates"], state["reward_center"], state["reward_scale"])
        controller.online.load_state_dict(state["online"])
        controller.target.load_state_dict(state["target"])
        controller.optimizer.load_state_dict(state["optimizer"])
        for item in state["buffer"]:
            controller.buffer.add(Transition(**item))
        controller.random.setstate(state["random"])
        controller.buffer.random.setstate(state["buffer_random"])
        return controller, state.get("extra", {})
