"""``layerwise runtime train|test``: train the runtime controller under machine load, then compare it with
every fixed profile on disjoint test prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
import uvicorn

import layerwise

from ..cache import atomic_write_json
from ..calibration import CalibrationSource
from ..cli_common import cli_errors, console
from ..data.zeroshot_tasks import parse_tasks
from ..report.tables import markdown_table
from .accuracy import accuracy_table, profile_accuracy
from .controller import Controller, DqnSettings
from .load import parse_load_profile
from .objectives import ObjectiveRange
from .profiles import parse_profiles
from .prompts import split_prompts
from .report import text_report, training_plots
from .server import create_app
from .session import (
    REWARD_MODES,
    RewardSettings,
    RuntimeEnvironment,
    TrainSettings,
    check_checkpoint_model,
    compare,
    fixed_policies,
    oracle_table,
    profile_quality,
    require_objectives,
)
from .session import retrain as run_retrain
from .session import test as run_test
from .session import train as run_train

runtime_app = typer.Typer(no_args_is_help=True, help="Runtime-adaptive pruning: a Double DQN picks a profile per request.")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name, directory or .gguf file.")]
Checkpoint = Annotated[Path, typer.Option("--checkpoint", help="Controller checkpoint (written after every episode).")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="Tokens decoded per request.")]
LoadProfile = Annotated[str, typer.Option("--load-profile", help="Load conditions cycled over episodes: idle,cpu,memory,mixed.")]
Mechanism = Annotated[str, typer.Option("--mechanism", help="Profiles as sliced views (real speedup) or masks.")]
Nsamples = Annotated[int, typer.Option("--nsamples", help="Calibration windows for the importance scores.")]
ImportanceOpt = Annotated[str, typer.Option("--importance", help="Unit importance from the calibration Profile: act (magnitude) or taylor.")]
Seed = Annotated[int, typer.Option("--seed", help="Prompt split and controller seed.")]
TpsScale = Annotated[float, typer.Option("--tps-scale", help="tokens/s normaliser of the reward (1: the seed's 0.6·tokens/s − 0.4·PPL/10; 0: the dense model's idle tokens/s).")]
PplScale = Annotated[float, typer.Option("--ppl-scale", help="PPL normaliser of the reward (0.6·tps/tps_scale − 0.4·PPL/ppl_scale).")]
RewardMode = Annotated[str, typer.Option("--reward", help="linear: the seed's 0.6·tokens/s − 0.4·PPL/10; slo: log-likelihood when the request meets its latency objective, a penalty scaled by the overrun when not.")]
SloMs = Annotated[Optional[str], typer.Option("--slo-ms", help="Latency objectives in ms, LOW:HIGH (drawn log-uniformly per request) or one value; 0.5x:4x draws factors of the dense model's idle latency for each request instead.")]
SloPenalty = Annotated[float, typer.Option("--slo-penalty", help="slo reward: nats lost by a missed objective (plus --slo-overrun per objective's worth of overrun).")]
SloOverrun = Annotated[float, typer.Option("--slo-overrun", help="slo reward: nats lost per objective's worth of overrun.")]
Profiles = Annotated[str, typer.Option("--profiles", help="Profiles the controller chooses from, e.g. none,ffn_neurons@0.5,transformer_layers@0.3 (empty: every kind at 3 intensities).")]


def _environment(model: str, nsamples: int, seed: int, max_new_tokens: int, mechanism: str, importance: str,
                 profiles: str | list[str] = ""):
    specs = parse_profiles(profiles if isinstance(profiles, str) else ",".join(profiles))
    loaded = layerwise.load(model)
    calibration = CalibrationSource(loaded, layerwise.RunSettings(nsamples=nsamples, seed=seed))
    return RuntimeEnvironment(loaded, calibration, max_new_tokens, mechanism=mechanism, importance=importance,
                              specs=specs)


def _objectives(text: str | None):
    return ObjectiveRange.parse(text) if text else None


def _reward(mode: str, slo_ms: str | None, slo_penalty: float, slo_overrun: float, **scales: float):
    """The reward settings and the objective range, refusing the slo reward without objectives before any
    model is loaded."""

    rewards = RewardSettings(mode=REWARD_MODES.canonical(mode), slo_penalty=slo_penalty, slo_overrun=slo_overrun,
                             **scales)
    objectives = _objectives(slo_ms)
    require_objectives(rewards, objectives)
    return rewards, objectives


@runtime_app.command()
def train(
    model: ModelOpt = "smollm2-135m",
    checkpoint: Checkpoint = Path("runtime/ckpt.pt"),
    episodes: Annotated[int, typer.Option("--episodes", help="Episodes (one load condition each).")] = 50,
    train_samples: Annotated[int, typer.Option("--train-samples", help="Training prompts.")] = 500,
    steps_per_episode: Annotated[int, typer.Option("--steps-per-episode", help="Requests per episode.")] = 10,
    max_new_tokens: MaxNew = 20,
    load_profile: LoadProfile = "idle,cpu,memory,mixed",
    mechanism: Mechanism = "sliced",
    importance: ImportanceOpt = "act",
    nsamples: Nsamples = 32,
    seed: Seed = 0,
    tps_scale: TpsScale = 1.0,
    ppl_scale: PplScale = 10.0,
    exploration_steps: Annotated[int, typer.Option("--exploration-steps", help="Requests over which ε decays from 1 to 0.05.")] = 400,
    reward: RewardMode = "linear",
    slo_ms: SloMs = None,
    slo_penalty: SloPenalty = 8.0,
    slo_overrun: SloOverrun = 2.0,
    profiles: Profiles = "",
    gamma: Annotated[float, typer.Option("--gamma", min=0.0, max=1.0, help="Discount of the next request's value (0: each request on its own, a contextual bandit).")] = 0.3,
    counterfactual: Annotated[bool, typer.Option("--counterfactual/--on-policy", help="Also serve each training request under every other profile and learn from every outcome (6 profiles: 6x the serving time per request).")] = False,
    warm_requests: Annotated[int, typer.Option("--warm-requests", min=0, help="Dense requests served, unrecorded, after each episode's load starts, so the running slowdowns in the first state describe that load and not the last one.")] = 3,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint.")] = False,
) -> None:
    """Train the Double DQN controller; writes the checkpoint, a text report and plots beside it."""

    @cli_errors
    def run() -> None:
        conditions = parse_load_profile(load_profile)
        rewards, objectives = _reward(reward, slo_ms, slo_penalty, slo_overrun, tps_scale=tps_scale,
                                      ppl_scale=ppl_scale)
        prompts, _ = split_prompts(train_samples, 0, seed)
        env = _environment(model, nsamples, seed, max_new_tokens, mechanism, importance, profiles)
        settings = TrainSettings(episodes, steps_per_episode, conditions,
                                 objectives=objectives, counterfactual=counterfactual,
                                 warm_requests=warm_requests, seed=seed)
        dqn = DqnSettings(seed=seed, gamma=gamma, epsilon_decay_steps=exploration_steps)
        controller, records = run_train(env, prompts, settings, rewards, checkpoint, dqn, resume)
        folder = checkpoint.parent
        (folder / "train_report.md").write_text(text_report(records, f"Runtime controller training ({model})"))
        plots = training_plots(records, folder / "plots")
        console.print(f"{len(records)} requests over {episodes} episodes; checkpoint {checkpoint}; "
                      f"report {folder / 'train_report.md'}; {len(plots)} plots in {folder / 'plots'}")

    run()


def controller_names(checkpoints: list[Path]) -> dict[str, Path]:
    """Policy names of the tested controllers: ``controller`` for one, ``controller:<file stem>`` for several."""
    if len(checkpoints) == 1:
        return {"controller": checkpoints[0]}
    names = {f"controller:{path.stem}": path for path in checkpoints}
    if len(names) != len(checkpoints):
        raise typer.BadParameter("Controllers tested together need checkpoint files of different names.")
    return names


@runtime_app.command()
def test(
    model: ModelOpt = "smollm2-135m",
    checkpoint: Annotated[list[Path], typer.Option("--checkpoint", help="Controller checkpoint; repeat it to test several controllers (training seeds, discounts) on the same paired requests.")] = [Path("runtime/ckpt.pt")],  # noqa: B006
    max_new_tokens: MaxNew = 50,
    ppl_samples: Annotated[int, typer.Option("--ppl-samples", help="Test prompts (disjoint from training).")] = 200,
    train_samples: Annotated[int, typer.Option("--train-samples", help="Training prompts to keep out (as in train).")] = 500,
    load_profile: LoadProfile = "idle,cpu,memory,mixed",
    mechanism: Mechanism = "sliced",
    importance: ImportanceOpt = "act",
    nsamples: Nsamples = 32,
    seed: Seed = 0,
    quality_prompts: Annotated[int, typer.Option("--quality-prompts", min=0, help="Training prompts on which each profile's NLL is measured at start-up to rank the no-learning rule's profiles (0: no rule).")] = 16,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where test_report.md and test.json go (default: beside the first checkpoint).")] = None,
    lm_eval: Annotated[bool, typer.Option("--lm-eval", help="Also score zero-shot accuracy of the dense model and of every profile the controllers chose.")] = False,
    tasks: Annotated[str, typer.Option("--tasks", help="Zero-shot tasks for --lm-eval.")] = "arc_easy,boolq",
    limit: Annotated[Optional[int], typer.Option("--limit", min=0, help="Zero-shot items per task for --lm-eval (0 = all).")] = 200,
    slo_ms: Annotated[Optional[str], typer.Option("--slo-ms", help="Latency objectives in ms, LOW:HIGH or one value, or factors of the dense idle latency such as 0.5x:4x (default: the training's).")] = None,
) -> None:
    """Serve the test prompts with the learned controllers, the no-learning rule (the best-quality profile
    predicted to meet the objective) and every fixed profile, under each load, back to back."""

    @cli_errors
    def run() -> None:
        conditions = parse_load_profile(load_profile)
        if lm_eval:
            parse_tasks(tasks)  # an unknown task fails now, not after the test
        paths = controller_names(checkpoint)
        loaded = {name: Controller.load(path) for name, path in paths.items()}
        (first, extra), *others = loaded.values()
        if any(other.actions != first.actions or other_extra["reward"] != extra["reward"]
               for other, other_extra in others):
            raise typer.BadParameter("Controllers tested together need the same profiles and reward.")
        training, prompts = split_prompts(train_samples, ppl_samples, seed)
        env = _environment(model, nsamples, seed, max_new_tokens, mechanism, importance, first.actions)
        for name, path in paths.items():
            check_checkpoint_model(loaded[name][1], env.loaded, path)
        objectives = _objectives(slo_ms or extra.get("objectives"))
        quality = profile_quality(env, training[:quality_prompts]) if quality_prompts else None
        records = run_test(env, {name: controller for name, (controller, _) in loaded.items()}, prompts, conditions,
                           RewardSettings(**extra["reward"]), objectives=objectives, seed=seed, quality=quality)
        folder = out or checkpoint[0].parent
        atomic_write_json(folder / "test.json", records)
        if quality is not None:
            atomic_write_json(folder / "profile_quality.json", quality)
        report = text_report(records, f"Runtime controller test ({model})")
        if lm_eval:
            chosen = sorted({r["profile"] for r in records if r["policy"].startswith("controller")})
            scores = profile_accuracy(env, chosen, tasks, limit or None, seed)
            atomic_write_json(folder / "test_zeroshot.json", {k: v.model_dump() for k, v in scores.items()})
            report += f"\n\n## Zero-shot accuracy of the controllers' profiles\n\n{accuracy_table(scores, env)}\n"
        (folder / "test_report.md").write_text(report)
        console.print(report)

    run()


@runtime_app.command()
def retrain(
    source: Annotated[Path, typer.Option("--from", help="A controller checkpoint trained with --counterfactual: its replay buffer is the log of served requests.")],
    checkpoint: Checkpoint = Path("runtime/ckpt-retrained.pt"),
    seed: Annotated[int, typer.Option("--seed", help="Controller seed (initial weights, replay sampling).")] = 0,
    gamma: Annotated[float, typer.Option("--gamma", min=0.0, max=1.0, help="Discount of the next request's value.")] = 0.0,
) -> None:
    """Train a new controller on another's logged transitions, in their order, with another seed or discount:
    seeds and discounts then compare on the same served requests, without serving them again."""

    @cli_errors
    def run() -> None:
        controller = run_retrain(source, checkpoint, seed, gamma)
        console.print(f"{controller.steps} transitions of {source} learned with seed {seed}, γ = {gamma:g}; "
                      f"checkpoint {checkpoint}")

    run()


@runtime_app.command()
def oracle(
    model: ModelOpt = "smollm2-135m",
    out: Annotated[Path, typer.Option("--out", help="Where oracle.md and oracle.json go.")] = Path("runtime"),
    samples: Annotated[int, typer.Option("--samples", help="Prompts served per condition (from the training side of the split).")] = 16,
    train_samples: Annotated[int, typer.Option("--train-samples", help="Training prompts the samples are drawn from (as in train).")] = 500,
    max_new_tokens: MaxNew = 20,
    load_profile: LoadProfile = "idle,spin1,spin2,memory",
    mechanism: Mechanism = "sliced",
    importance: ImportanceOpt = "act",
    nsamples: Nsamples = 32,
    seed: Seed = 0,
    reward: RewardMode = "slo",
    slo_ms: SloMs = None,
    slo_penalty: SloPenalty = 8.0,
    slo_overrun: SloOverrun = 2.0,
    profiles: Profiles = "",
) -> None:
    """Before training: serve prompts with every fixed profile under each load and print which one is best
    where. A controller can only win where that answer changes; if one profile wins everywhere, widen the
    conditions (objectives, loads, prompt lengths)."""

    @cli_errors
    def run() -> None:
        conditions = parse_load_profile(load_profile)
        rewards, objectives = _reward(reward, slo_ms, slo_penalty, slo_overrun)
        prompts, _ = split_prompts(train_samples, 0, seed)
        env = _environment(model, nsamples, seed, max_new_tokens, mechanism, importance, profiles)
        records = compare(env, fixed_policies(env), prompts[:samples], conditions, rewards, objectives, seed + 7,
                          desc="runtime oracle")
        table = oracle_table(records)
        rows = [[row["condition"], row["best"], "; ".join(f"{name} {value:.3f}" + (f" ({100 * met:.0f}% met)" if met is not None else "")
                                                          for name, value, met in row["ranking"])] for row in table]
        report = "# Oracle: the best fixed profile per condition\n\n" + markdown_table(
            ["load", "best fixed profile", "mean reward of each (objective attainment)"], rows)
        if len({row["best"] for row in table}) == 1:
            report += (f"\n\nOne profile ({table[0]['best']}) is best under every condition: no state-dependent "
                       "choice can beat it here; widen the objectives, loads or prompt lengths.")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "oracle.json", {"table": table, "records": records})
        (out / "oracle.md").write_text(report + "\n")
        console.print(report)

    run()


def serve(
    model: ModelOpt = "smollm2-135m",
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Controller checkpoint (none: always dense).")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    mechanism: Mechanism = "sliced",
    importance: ImportanceOpt = "act",
    nsamples: Nsamples = 32,
    seed: Seed = 0,
    slo_ms: Annotated[Optional[float], typer.Option("--slo-ms", min=1, help="Latency objective (ms) of requests that state none.")] = None,
    profiles: Profiles = "",
) -> None:
    """Serve POST /generate, the OpenAI-compatible /v1/completions and /v1/chat/completions, and GET /metrics;
    the controller picks a profile per request (its checkpoint fixes the profiles)."""

    @cli_errors
    def run() -> None:
        controller, extra = Controller.load(checkpoint) if checkpoint is not None else (None, {})
        chosen = controller.actions if controller is not None else profiles
        env = _environment(model, nsamples, seed, 0, mechanism, importance, chosen)
        check_checkpoint_model(extra, env.loaded, checkpoint)
        uvicorn.run(create_app(env, controller, slo_ms, model), host=host, port=port)

    run()
