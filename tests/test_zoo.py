"""rl-zoo3 integration: the tdmpc-zoo launcher, the shipped hyperparameters, the Optuna sampler."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import optuna
import pytest
import yaml
from stable_baselines3.common.env_util import make_vec_env

import sb3_tdmpc
from sb3_tdmpc import TDMPC, PrioritizedReplayBuffer, TDMPCPolicy
from sb3_tdmpc.common.checkpoint import ResumeWarning
from sb3_tdmpc.envs import METAWORLD_TASKS
from sb3_tdmpc.zoo import (
    VERBS,
    ContinuingTDMPC,
    InferenceTDMPC,
    default_config_path,
    prepare_args,
    register,
    sample_tdmpc_params,
    shipped_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_ID = "reach-v3"
# A tiny network and planner: the zoo's plumbing is under test, not learning.
TINY_PARAMS = [
    "policy_kwargs:dict(latent_dim=8,mlp_dim=32,enc_dim=16)",
    "num_samples:32",
    "num_elites:4",
    "planning_iterations:2",
    "horizon:3",
    "learning_starts:100",
    "seed_updates:5",
    "batch_size:16",
    "buffer_size:2000",
]
SUBPROCESS_TIMEOUT = 300

# Keys rl-zoo3's ExperimentManager consumes itself (exp_manager.py: read_hyperparameters,
# _preprocess_hyperparams, _preprocess_action_noise); all others go to the algorithm's constructor.
ZOO_KEYS = {
    "n_timesteps",
    "n_envs",
    "normalize",
    "env_wrapper",
    "vec_env_wrapper",
    "env_kwargs",
    "frame_stack",
    "callback",
    "monitor_kwargs",
    "noise_type",
    "noise_std",
}
# Constructor arguments the zoo passes itself: a YAML entry setting them would clash.
ZOO_SET_ARGS = {"env", "tensorboard_log", "seed", "verbose", "device", "_init_setup_model"}
TDMPC_ARGS = set(inspect.signature(TDMPC.__init__).parameters) - {"self"} - ZOO_SET_ARGS


def load_yaml() -> dict:
    with open(default_config_path()) as f:
        return yaml.safe_load(f)


def run_zoo(*args: str, entry: str = "module") -> subprocess.CompletedProcess:
    """Run the launcher as a user would: `python -m sb3_tdmpc.zoo ...` or the `tdmpc-zoo` script."""
    if entry == "script":
        command = [str(Path(sys.executable).parent / "tdmpc-zoo"), *args]
    else:
        command = [sys.executable, "-m", "sb3_tdmpc.zoo", *args]
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


# --------------------------------------------------------------------------- shipped YAML


TDMPC_POLICY_ARGS = set(inspect.signature(TDMPCPolicy.__init__).parameters)


def test_yaml_parses_and_every_key_is_a_tdmpc_argument_or_a_zoo_key():
    hyperparams = load_yaml()
    assert "default" in hyperparams
    for env_id, entry in hyperparams.items():
        unknown = set(entry) - TDMPC_ARGS - ZOO_KEYS
        assert not unknown, f"{env_id}: {sorted(unknown)} are neither TDMPC arguments nor rl-zoo3 keys"
        policy_class = TDMPC.policy_aliases[entry["policy"]]
        assert float(entry["n_timesteps"]) > 0
        # The zoo evaluates these strings; what they give must be accepted too.
        policy_kwargs = eval(entry["policy_kwargs"])
        accepted = {*inspect.signature(policy_class.__init__).parameters, *TDMPC_POLICY_ARGS}
        assert set(policy_kwargs) <= accepted
        buffer_kwargs = eval(entry["replay_buffer_kwargs"])
        assert set(buffer_kwargs) <= set(inspect.signature(PrioritizedReplayBuffer.__init__).parameters)


def test_yaml_env_ids_are_registered_and_cover_metaworld():
    hyperparams = load_yaml()
    env_ids = set(hyperparams) - {"default"}
    unregistered = env_ids - set(gym.registry)
    assert not unregistered, f"not registered after `import sb3_tdmpc`: {sorted(unregistered)}"
    assert set(METAWORLD_TASKS) <= env_ids  # 50 tasks: test_envs
    assert {"Pendulum-v1", "HalfCheetah-v5", "Hopper-v5", "Walker2d-v5"} <= env_ids


def test_yaml_metaworld_protocol():
    hyperparams = load_yaml()
    for task in METAWORLD_TASKS:
        entry = hyperparams[task]
        # 1M simulator steps at action repeat 2 = 5e5 agent steps (SB3 num_timesteps).
        assert entry["env_kwargs"] == {"action_repeat": 2}, task
        assert float(entry["n_timesteps"]) == 5e5, task
        # Monitor needs a tuple: the zoo evaluates the string.
        assert eval(entry["monitor_kwargs"]) == {"info_keywords": ("is_success",)}, task


def test_yaml_default_entry_is_tdmpc_defaults():
    """The YAML spells out the official settings; it must not drift from TDMPC's own defaults."""
    default = load_yaml()["default"]
    signature = inspect.signature(TDMPC.__init__).parameters
    for key, value in default.items():
        if key in ZOO_KEYS or key in ("policy_kwargs", "replay_buffer_kwargs"):
            continue
        assert value == signature[key].default, (
            f"default.{key}: {value} != TDMPC default {signature[key].default}"
        )
    policy_defaults = inspect.signature(TDMPCPolicy.__init__).parameters
    for key, value in eval(default["policy_kwargs"]).items():
        assert value == policy_defaults[key].default, key
    buffer_defaults = inspect.signature(PrioritizedReplayBuffer.__init__).parameters
    for key, value in eval(default["replay_buffer_kwargs"]).items():
        assert value == buffer_defaults[key].default, key


# --------------------------------------------------------------------------- launcher


def test_default_config_path_is_package_data():
    path = default_config_path()
    assert path.is_file()
    assert path == Path(sb3_tdmpc.__file__).parent / "hyperparams" / "tdmpc.yml"
    # One source of truth: the checkout's top-level hyperparams/tdmpc.yml is the same file.
    top_level = REPO_ROOT / "hyperparams" / "tdmpc.yml"
    if top_level.exists():
        assert top_level.resolve() == path.resolve()
    with pytest.raises(FileNotFoundError):
        default_config_path("no-such-algo")


@pytest.mark.parametrize(
    "args, expected",
    [
        # No -conf: the shipped YAML; no --algo: tdmpc.
        (["--env", ENV_ID], ["--algo", "tdmpc", "--conf-file", "<default>", "--env", ENV_ID]),
        (
            ["--algo", "tdmpc", "--env", ENV_ID],
            ["--conf-file", "<default>", "--algo", "tdmpc", "--env", ENV_ID],
        ),
        # The user's -conf, in any of argparse's spellings, is left alone.
        (["--algo", "tdmpc", "-conf", "my.yml"], ["--algo", "tdmpc", "-conf", "my.yml"]),
        (["--algo=tdmpc", "--conf-file=my.yml"], ["--algo=tdmpc", "--conf-file=my.yml"]),
        (["-conf", "mod.hyperparams"], ["--algo", "tdmpc", "-conf", "mod.hyperparams"]),
        (["--conf", "my.yml", "--algo", "tdmpc"], ["--conf", "my.yml", "--algo", "tdmpc"]),
        # A -conf that is no file here but names one shipped with the package (pip installs have no checkout).
        (["-conf", "tdmpc_cpu.yml"], ["--algo", "tdmpc", "-conf", "<cpu>"]),
        (["--conf-file=tdmpc_cpu", "--seed", "1"], ["--algo", "tdmpc", "--conf-file=<cpu>", "--seed", "1"]),
        (["-conf", "hyperparams/tdmpc_cpu.yml"], ["--algo", "tdmpc", "-conf", "hyperparams/tdmpc_cpu.yml"]),
        # Another zoo algorithm keeps the zoo's own hyperparameters.
        (["--algo", "sac", "--env", "Pendulum-v1"], ["--algo", "sac", "--env", "Pendulum-v1"]),
        # -params values are not mistaken for options.
        (
            ["-params", "batch_size:256", "--seed", "3"],
            ["--algo", "tdmpc", "--conf-file", "<default>", "-params", "batch_size:256", "--seed", "3"],
        ),
    ],
)
def test_prepare_args_train(args, expected):
    cpu = str(shipped_config("tdmpc_cpu"))
    expected = [str(default_config_path()) if a == "<default>" else a.replace("<cpu>", cpu) for a in expected]
    assert prepare_args("train", args) == expected


def test_conf_names_a_shipped_file_only_when_no_local_file_does(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert prepare_args("train", ["-conf", "sub/tdmpc_cpu.yml"])[-1] == "sub/tdmpc_cpu.yml"  # a path
    assert prepare_args("train", ["-conf", "tdmpc_cpu.yml"])[-1] == str(shipped_config("tdmpc_cpu"))
    (tmp_path / "tdmpc_cpu.yml").write_text("")
    assert prepare_args("train", ["-conf", "tdmpc_cpu.yml"])[-1] == "tdmpc_cpu.yml"  # the local file wins


def test_prepare_args_other_verbs():
    assert prepare_args("enjoy", ["--env", ENV_ID, "-f", "logs/"]) == [
        "--algo",
        "tdmpc",
        "--env",
        ENV_ID,
        "-f",
        "logs/",
    ]
    assert prepare_args("record_video", ["--algo", "tdmpc"]) == ["--algo", "tdmpc"]
    # Plot verbs take -a/--algo(s) their own way: untouched.
    assert prepare_args("plot_train", ["-a", "tdmpc", "-e", ENV_ID, "-f", "logs/"]) == [
        "-a",
        "tdmpc",
        "-e",
        ENV_ID,
        "-f",
        "logs/",
    ]


def test_verbs_mirror_the_zoo():
    rl_zoo3 = pytest.importorskip("rl_zoo3")
    cli_source = (Path(rl_zoo3.__file__).parent / "cli.py").read_text()
    for verb in ("train", "enjoy", "plot_train", "plot_from_file", "all_plots"):
        assert f'"{verb}"' in cli_source  # the zoo's own verbs...
        assert verb in VERBS  # ...are all ours
    assert {"record_video", "record_training", "push_to_hub", "load_from_hub"} <= set(VERBS)


def test_register_and_sampler():
    from rl_zoo3 import ALGOS
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_CONVERTER, HYPERPARAMS_SAMPLER

    register()
    assert ALGOS["tdmpc"] is ContinuingTDMPC and issubclass(ContinuingTDMPC, TDMPC)
    assert HYPERPARAMS_SAMPLER["tdmpc"] is sample_tdmpc_params
    register(inference=True)
    assert ALGOS["tdmpc"] is InferenceTDMPC
    register()

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        params = sample_tdmpc_params(trial, n_actions=4, n_envs=1, additional_args={})
        assert set(params) <= TDMPC_ARGS
        # --trial-id: the converter turns the stored params back into the same hyperparameters.
        assert HYPERPARAMS_CONVERTER["tdmpc"](trial.params) == params
        study.tell(trial, 0.0)


def test_a_checkpoint_beside_another_points_buffer_restarts_with_an_empty_buffer(tmp_path):
    # tdmpc-zoo train -i <run>/rl_model_100_steps.zip in a folder whose replay_buffer.pkl the run saved
    # at its end: the zoo loads both; the model must not continue on that buffer.
    policy_kwargs = dict(latent_dim=8, mlp_dim=16, enc_dim=16)
    tiny = dict(batch_size=16, learning_starts=50, seed_updates=5, num_samples=16, num_elites=4, horizon=3)
    model = ContinuingTDMPC(
        "Pendulum-v1", seed=0, buffer_size=1000, planning_iterations=1, policy_kwargs=policy_kwargs, **tiny
    )
    model.learn(100)
    model.save(tmp_path / "rl_model_100_steps.zip")
    model.learn(50, reset_num_timesteps=False)
    model.save(tmp_path / "final.zip")
    model.save_replay_buffer(tmp_path / "replay_buffer.pkl")

    checkpoint = ContinuingTDMPC.load(tmp_path / "rl_model_100_steps.zip", env=make_vec_env("Pendulum-v1"))
    checkpoint.load_replay_buffer(tmp_path / "replay_buffer.pkl")
    with pytest.warns(ResumeWarning, match="not the one saved with it .* restarts its step count"):
        checkpoint.learn(60)
    assert checkpoint.num_timesteps == 60 and checkpoint.replay_buffer.pos == 60

    final = ContinuingTDMPC.load(tmp_path / "final.zip", env=make_vec_env("Pendulum-v1"))
    final.load_replay_buffer(tmp_path / "replay_buffer.pkl")
    with pytest.warns(ResumeWarning, match="middle of an episode"):  # saved at step 150 of 200
        final.learn(60)  # its own buffer: the run continues
    assert final.num_timesteps == 210 and final.replay_buffer.pos == 210

    # A later save of the run's full buffer can sit at the checkpoint's write position (here both at 0):
    # the rows it has been given tell them apart.
    small = {**tiny, "learning_starts": 10_000}  # seed steps only: cheap, and all that is needed
    model = ContinuingTDMPC("Pendulum-v1", seed=0, buffer_size=100, policy_kwargs=policy_kwargs, **small)
    model.learn(100)
    model.save(tmp_path / "rl_model_100_steps.zip")
    model.learn(100, reset_num_timesteps=False)
    model.save_replay_buffer(tmp_path / "replay_buffer.pkl")
    checkpoint = ContinuingTDMPC.load(tmp_path / "rl_model_100_steps.zip", env=make_vec_env("Pendulum-v1"))
    checkpoint.load_replay_buffer(tmp_path / "replay_buffer.pkl")
    assert checkpoint.replay_buffer.pos == 0 and checkpoint._resume_state["buffer_position"][0] == 0
    with pytest.warns(ResumeWarning, match="not the one saved with it .* restarts its step count"):
        checkpoint.learn(10)
    assert checkpoint.num_timesteps == 10


def test_inference_load_allocates_a_minimal_buffer(tmp_path):
    model = TDMPC(
        "MlpPolicy",
        "Pendulum-v1",
        buffer_size=100_000,
        horizon=3,
        num_samples=16,
        num_elites=4,
        planning_iterations=1,
        policy_kwargs=dict(latent_dim=8, mlp_dim=16, enc_dim=16),
        seed=0,
    )
    model.save(tmp_path / "model.zip")
    obs = np.zeros((1, 3), dtype=np.float32)

    loaded = InferenceTDMPC.load(tmp_path / "model.zip", device="cpu")
    assert isinstance(loaded, TDMPC)
    assert loaded.replay_buffer.buffer_size == 1
    assert loaded.replay_buffer.observations.nbytes < 100
    for p, q in zip(model.policy.parameters(), loaded.policy.parameters(), strict=True):
        assert np.array_equal(p.detach().numpy(), q.detach().numpy())
    action, _ = loaded.predict(obs, deterministic=True)
    assert action.shape == (1, 1)
    # An explicit buffer_size still wins (e.g. to continue training).
    assert InferenceTDMPC.load(tmp_path / "model.zip", buffer_size=500).replay_buffer.buffer_size == 500


def test_unknown_verb_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "sb3_tdmpc.zoo", "no_such_verb"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "unknown verb" in result.stderr
    help_text = run_zoo("--help", entry="script").stdout
    assert all(verb in help_text for verb in VERBS)


# --------------------------------------------------------------------------- real zoo runs


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory) -> Path:
    """`python -m sb3_tdmpc.zoo train` on a Meta-World id, without -conf: the shipped YAML is used."""
    folder = tmp_path_factory.mktemp("zoo") / "logs"
    run_zoo(
        "train",
        "--algo",
        "tdmpc",
        "--env",
        ENV_ID,
        "-n",
        "600",
        "--eval-freq",
        "300",
        "--eval-episodes",
        "1",
        "--n-eval-envs",
        "1",
        "--save-freq",
        "300",
        "--seed",
        "1",
        "--num-threads",
        "1",
        "-f",
        str(folder),
        "-params",
        *TINY_PARAMS,
    )
    return folder


def test_train_writes_the_zoo_log_folder(trained_folder):
    run = trained_folder / "tdmpc" / f"{ENV_ID}_1"
    assert (run / f"{ENV_ID}.zip").is_file()
    assert (run / "best_model.zip").is_file()
    assert (run / "rl_model_300_steps.zip").is_file()
    model = TDMPC.load(run / f"{ENV_ID}.zip", buffer_size=10)
    assert model.num_timesteps == 600

    evaluations = np.load(run / "evaluations.npz")
    assert list(evaluations["timesteps"]) == [300, 600]
    assert evaluations["successes"].shape == (2, 1)

    monitor = (run / "0.monitor.csv").read_text().splitlines()
    assert monitor[1].split(",") == ["r", "l", "t", "is_success"]
    # 600 agent steps = two full 250-step episodes (500 simulator steps each at action repeat 2).
    episodes = monitor[2:]
    assert len(episodes) == 2
    assert all(row.split(",")[1] == "250" and row.split(",")[3] in ("True", "False") for row in episodes)

    # Without -conf the launcher gave the zoo the shipped YAML.
    with open(run / ENV_ID / "args.yml") as f:
        args = yaml.load(f, Loader=yaml.UnsafeLoader)
    assert args["conf_file"] == str(default_config_path())
    with open(run / ENV_ID / "config.yml") as f:
        config = dict(yaml.load(f, Loader=yaml.UnsafeLoader))
    assert config["env_kwargs"] == {"action_repeat": 2}
    assert config["batch_size"] == 16  # -params override


def test_enjoy_headless(trained_folder):
    result = run_zoo(
        "enjoy",
        "--algo",
        "tdmpc",
        "--env",
        ENV_ID,
        "-f",
        str(trained_folder),
        "--no-render",
        "-n",
        "260",
        "--num-threads",
        "1",
        entry="script",
    )
    assert "Episode Length 250" in result.stdout
    assert "Success rate:" in result.stdout


def test_optimize_two_trials_in_sqlite_storage(tmp_path):
    storage = f"sqlite:///{tmp_path / 't.db'}"
    run_zoo(
        "train",
        "--algo",
        "tdmpc",
        "--env",
        ENV_ID,
        "-optimize",
        "--n-trials",
        "2",
        "--n-jobs",
        "1",
        "--n-evaluations",
        "1",
        "--eval-episodes",
        "1",
        "--no-optim-plots",
        "--storage",
        storage,
        "--study-name",
        "s",
        "-n",
        "200",
        "--seed",
        "1",
        "--num-threads",
        "1",
        "-f",
        str(tmp_path / "logs"),
        "-params",
        *TINY_PARAMS,
    )
    study = optuna.load_study(study_name="s", storage=storage)
    assert len(study.trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert set(study.best_trial.params) <= TDMPC_ARGS
