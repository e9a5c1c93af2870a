"""Checkpoints that resume exactly, determinism, clear errors on bad input, numerical faults.

docs/reliability.md lists each guarantee with the test here that proves it.
"""

import io
import pickle
import random
import re
import subprocess
import sys
import textwrap
import warnings
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import TINY, TINY_POLICY
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import VecFrameStack, VecNormalize

import sb3_tdmpc  # noqa: F401  (registers the Meta-World ids)
from sb3_tdmpc import TDMPC
from sb3_tdmpc.common.checkpoint import CheckpointError, NonFiniteTransitionWarning, ResumeWarning
from sb3_tdmpc.envs.wrappers import VecFlattenDictObservation

BUFFER_FIELDS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def assert_same_state(a: TDMPC, b: TDMPC) -> None:
    """Bitwise: networks (target included), both optimizers, replay buffer and priorities, counters."""
    for (name, p), q in zip(a.policy.state_dict().items(), b.policy.state_dict().values(), strict=True):
        assert th.equal(p, q), name
    for optimizer in ("optimizer", "pi_optimizer"):
        state_a = getattr(a.policy, optimizer).state_dict()["state"]
        state_b = getattr(b.policy, optimizer).state_dict()["state"]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            for field, value in state_a[key].items():
                assert th.equal(value, state_b[key][field]), (optimizer, key, field)
    rb_a, rb_b = a.replay_buffer, b.replay_buffer
    for field in BUFFER_FIELDS:
        assert np.array_equal(getattr(rb_a, field), getattr(rb_b, field)), field
    assert np.array_equal(rb_a.tree.nodes, rb_b.tree.nodes)
    assert (rb_a.pos, rb_a.full, rb_a.max_priority) == (rb_b.pos, rb_b.full, rb_b.max_priority)
    assert (a.num_timesteps, a._n_updates, a._episode_num) == (b.num_timesteps, b._n_updates, b._episode_num)
    assert (a.policy.planning_horizon, a.policy.std_floor) == (b.policy.planning_horizon, b.policy.std_floor)


def scramble_global_rngs() -> None:
    """What a new process would have: nothing of the saved run's RNG states."""
    th.manual_seed(12345)
    np.random.seed(12345)  # noqa: NPY002
    random.seed(12345)


# --------------------------------------------------------------------------- 1. resume exactly


@pytest.mark.parametrize(
    ("env_id", "n_envs", "frame_stack", "episode"), [("Pendulum-v1", 2, 2, 200), ("reach-v3", 1, 0, 250)]
)
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(
    tmp_path, env_id, n_envs, frame_stack, episode
):
    """N steps, save (model + buffer), load in fresh objects, M more steps == N + M steps, bitwise."""
    n, m = episode * n_envs, 40
    kwargs = dict(**{**TINY, "learning_starts": n - 30}, seed=0)

    def make_env():
        env = make_vec_env(env_id, n_envs=n_envs, seed=0)
        return VecFrameStack(env, frame_stack) if frame_stack else env  # a VecEnv wrapper with state

    # The uninterrupted run; its CheckpointCallback writes a checkpoint at step N on the way.
    uninterrupted = TDMPC("MlpPolicy", make_env(), **kwargs)
    callback = CheckpointCallback(n // n_envs, str(tmp_path / "callback"), save_replay_buffer=True)
    uninterrupted.learn(n + m, callback=callback)

    # N steps, save, load in new objects with a new env, M more steps.
    first = TDMPC("MlpPolicy", make_env(), **kwargs)
    first.learn(n)
    first.save(tmp_path / "model")
    first.save_replay_buffer(tmp_path / "buffer")
    del first
    scramble_global_rngs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        resumed = TDMPC.load(tmp_path / "model", env=make_env(), seed=0)  # as the zoo's -i passes a seed
        resumed.load_replay_buffer(tmp_path / "buffer")
        resumed.learn(m, reset_num_timesteps=False)
    assert_same_state(uninterrupted, resumed)

    # The same from the CheckpointCallback's files, written in the middle of learn().
    scramble_global_rngs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        from_callback = TDMPC.load(tmp_path / "callback" / f"rl_model_{n}_steps.zip", env=make_env())
        from_callback.load_replay_buffer(tmp_path / "callback" / f"rl_model_replay_buffer_{n}_steps.pkl")
        from_callback.learn(m, reset_num_timesteps=False)
    assert_same_state(uninterrupted, from_callback)


def test_resave_of_a_loaded_model_keeps_the_run_state(tmp_path):
    model = TDMPC("Pendulum-v1", seed=0, **{**TINY, "learning_starts": 1000})
    model.learn(30)
    model.save(tmp_path / "a")
    loaded = TDMPC.load(tmp_path / "a", env=make_vec_env("Pendulum-v1", seed=0))
    th.manual_seed(7)  # e.g. predict() between load and save
    loaded.save(tmp_path / "b")
    again = TDMPC.load(tmp_path / "b")
    saved, resaved = loaded._resume_state, again._resume_state
    assert th.equal(saved["rng"]["global"]["torch"], resaved["rng"]["global"]["torch"])
    assert np.array_equal(saved["last_obs"], resaved["last_obs"])


def seed_phase_model(**kwargs):
    # Seed-phase steps only (random actions, no update): cheap, and enough for what is tested.
    return TDMPC("Pendulum-v1", seed=0, **{**TINY, "learning_starts": 10_000, **kwargs})


def test_resume_mid_episode_warns_and_closes_the_episode_as_a_timeout(tmp_path):
    model = seed_phase_model()
    model.learn(150)  # Pendulum episodes last 200 steps
    model.save(tmp_path / "model")
    model.save_replay_buffer(tmp_path / "buffer")
    resumed = TDMPC.load(tmp_path / "model", env=make_vec_env("Pendulum-v1", seed=0))
    resumed.load_replay_buffer(tmp_path / "buffer")
    assert resumed.replay_buffer.dones[149, 0] == 0
    with pytest.warns(
        ResumeWarning, match=r"not exactly: environment\(s\) \[0\] were in the middle of an episode"
    ):
        resumed.learn(10, reset_num_timesteps=False)
    rb = resumed.replay_buffer
    # The cut episode ends at its last stored transition, as a time-out (bootstrapped, not terminal).
    assert rb.dones[149, 0] == 1 and rb.timeouts[149, 0] == 1
    assert rb.pos == 160 and resumed.num_timesteps == 160


def test_resume_with_force_reset_false_continues_the_episode_where_it_is(tmp_path):
    model = seed_phase_model()
    model.learn(150)  # mid-episode
    model.save(tmp_path / "model")
    model.save_replay_buffer(tmp_path / "buffer")
    env = model.get_env()
    resumed = TDMPC.load(tmp_path / "model", env=env, force_reset=False)  # SB3: the env is not reset
    resumed.load_replay_buffer(tmp_path / "buffer")
    with pytest.warns(ResumeWarning, match="force_reset=False, the environments are not reset"):
        resumed.learn(10, reset_num_timesteps=False)
    assert env.get_attr("_elapsed_steps") == [160]  # the same episode, 10 steps on
    rb = resumed.replay_buffer
    assert rb.dones[149, 0] == 0 and rb.pos == 160  # the episode goes on in the buffer too
    assert np.array_equal(rb.observations[150, 0], rb.next_observations[149, 0])


def test_resume_without_the_replay_buffer_warns(tmp_path):
    model = seed_phase_model()
    model.learn(200)
    model.save(tmp_path / "model")
    resumed = TDMPC.load(tmp_path / "model", env=make_vec_env("Pendulum-v1", seed=0))
    with pytest.warns(ResumeWarning, match="replay buffer is not the one saved with the checkpoint"):
        resumed.learn(5, reset_num_timesteps=False)


def test_resume_with_a_later_save_of_the_runs_buffer_at_the_same_position_warns(tmp_path):
    model = seed_phase_model(buffer_size=100)
    model.learn(200)
    model.save(tmp_path / "model")  # buffer full, write position 0
    model.learn(200, reset_num_timesteps=False)
    model.save_replay_buffer(tmp_path / "buffer")  # 200 steps later: full, write position 0 again
    resumed = TDMPC.load(tmp_path / "model", env=make_vec_env("Pendulum-v1", seed=0))
    resumed.load_replay_buffer(tmp_path / "buffer")
    with pytest.warns(ResumeWarning, match="replay buffer is not the one saved with the checkpoint"):
        resumed.learn(5, reset_num_timesteps=False)


def test_resume_past_the_seed_phase_without_the_replay_buffer_refills_it_then_trains(tmp_path):
    model = TDMPC("Pendulum-v1", seed=0, **TINY)  # learning_starts 50, batch 16
    model.learn(100)
    model.save(tmp_path / "model")
    resumed = TDMPC.load(tmp_path / "model", env=make_vec_env("Pendulum-v1", seed=0))
    updates = resumed._n_updates
    with pytest.warns(ResumeWarning, match="updates pause until it holds 50 transitions"):
        resumed.learn(80, reset_num_timesteps=False)
    # Steps 101-149 refill the empty buffer (planning, no update); steps 150-180 train, one update each.
    assert resumed.num_timesteps == 180 and resumed.replay_buffer.pos == 80
    assert resumed._n_updates - updates == 31


def test_resume_under_vec_normalize_warns_and_resets_once(tmp_path):
    env = VecNormalize(make_vec_env("Pendulum-v1", seed=0))
    model = TDMPC("MlpPolicy", env, seed=0, **TINY)
    model.learn(200)  # Pendulum's episodes end at 200 steps: an exact resume would be possible without it
    model.save(tmp_path / "model")
    model.save_replay_buffer(tmp_path / "buffer")
    env.save(tmp_path / "vec_normalize.pkl")
    env = VecNormalize.load(tmp_path / "vec_normalize.pkl", make_vec_env("Pendulum-v1", seed=0))
    resumed = TDMPC.load(tmp_path / "model", env=env)
    resumed.load_replay_buffer(tmp_path / "buffer")
    count = env.obs_rms.count
    with pytest.warns(ResumeWarning, match="wrapped in VecNormalize, whose state the model lacks"):
        resumed.learn(10, reset_num_timesteps=False)
    assert env.obs_rms.count == pytest.approx(count + 11)  # learn()'s one reset and 10 steps


def test_resume_of_a_model_saved_before_any_step_says_so(tmp_path):
    TDMPC("Pendulum-v1", **TINY).save(tmp_path / "model")
    resumed = TDMPC.load(tmp_path / "model", env=make_vec_env("Pendulum-v1", seed=0))
    with pytest.warns(ResumeWarning, match="saved before learn\\(\\) had stepped any environment"):
        resumed.learn(5, reset_num_timesteps=False)


def test_resume_after_an_interrupted_learn_warns(tmp_path):
    class Interrupt(BaseCallback):
        def _on_step(self):
            if self.num_timesteps == 200:
                raise KeyboardInterrupt
            return True

    model = seed_phase_model()
    with pytest.raises(KeyboardInterrupt):
        model.learn(300, callback=Interrupt())
    model.save(tmp_path / "model")  # as the zoo does on Ctrl-C
    model.save_replay_buffer(tmp_path / "buffer")
    resumed = TDMPC.load(tmp_path / "model", env=make_vec_env("Pendulum-v1", seed=0))
    resumed.load_replay_buffer(tmp_path / "buffer")
    with pytest.warns(ResumeWarning, match="saved after learn\\(\\) had stopped on an exception"):
        resumed.learn(5, reset_num_timesteps=False)


def test_a_learn_that_resets_the_envs_closes_unfinished_episodes():
    model = seed_phase_model()
    model.learn(150)
    assert model.replay_buffer.dones[149, 0] == 0
    model.learn(10)  # reset_num_timesteps=True: the envs are reset, the episode in the buffer is cut
    assert model.replay_buffer.dones[149, 0] == 1 and model.replay_buffer.timeouts[149, 0] == 1
    # Without handle_timeout_termination SB3 never writes time-out flags (every episode end is terminal):
    # a flag set here would outlive the row and turn a later true termination into a time-out.
    model = seed_phase_model(replay_buffer_kwargs={"handle_timeout_termination": False})
    model.learn(150)
    model.learn(10)
    assert model.replay_buffer.dones[149, 0] == 1 and not model.replay_buffer.timeouts.any()


# --------------------------------------------------------------------------- 2. determinism


class RecordingLogger:
    """Wraps a logger's ``record`` to keep every training statistic in order."""

    def __init__(self, model: TDMPC) -> None:
        self.values: list[tuple[str, float]] = []
        logger = configure(None, [])
        record = logger.record

        def recording(key, value, exclude=None):
            if key.startswith("train/") and key != "train/seconds_per_update":
                self.values.append((key, value))
            record(key, value, exclude)

        logger.record = recording
        model.set_logger(logger)


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "reach-v3"])
def test_same_seed_gives_the_same_losses_and_actions_for_1000_steps(env_id):
    # 900 seed steps (random actions, environment and action-space RNGs), then 100 planned steps with
    # one gradient update each (planner, policy noise, prioritized sampling: torch and numpy RNGs).
    def run():
        model = TDMPC(env_id, seed=3, **{**TINY, "learning_starts": 900})
        losses = RecordingLogger(model)
        model.learn(1000)
        return model, losses.values

    (first, losses_1), (second, losses_2) = run(), run()
    assert len(losses_1) > 500 and losses_1 == losses_2
    assert first.replay_buffer.pos == 1000 and first._n_updates == 104  # 5 seed updates, then 1 per step
    assert np.array_equal(first.replay_buffer.actions, second.replay_buffer.actions)
    assert_same_state(first, second)


# --------------------------------------------------------------------------- 3. bad input


class SpacesEnv(gym.Env):
    def __init__(self, observation_space, action_space):
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


@pytest.mark.parametrize(
    ("observation_space", "action_space", "match"),
    [
        (spaces.Box(-1, 1, (3,)), spaces.Discrete(3), "Discrete"),
        (spaces.Box(-1, 1, (3,)), spaces.MultiDiscrete([3, 2]), "MultiDiscrete"),
        (spaces.Box(-1, 1, (3,)), spaces.Box(-np.inf, np.inf, (2,)), "finite"),
        (spaces.Box(-1, 1, (3,)), spaces.Box(-5, 5, (2,), np.int64), "must be floating-point"),
        (
            spaces.Box(-1, 1, (3,)),
            spaces.Box(np.array([-1, 0]), np.array([1, 0]), dtype=np.float32),
            "low < high",
        ),
        (spaces.Box(-1, 1, (3,)), spaces.Box(-1, 1, (0,)), "at least one action dimension"),
        (spaces.Box(-1, 1, (0,)), spaces.Box(-1, 1, (2,)), "non-empty 1-D Box"),
        (spaces.Discrete(5), spaces.Box(-1, 1, (2,)), "observation"),
        (spaces.Dict(a=spaces.Box(-1, 1, (3,)), d=spaces.Discrete(3)), spaces.Box(-1, 1, (2,)), "all Boxes"),
        (
            spaces.Dict(state=spaces.Box(-1, 1, (3,)), camera=spaces.Box(0, 255, (64, 64, 3), np.uint8)),
            spaces.Box(-1, 1, (2,)),
            r"\['camera'\] are images; give image observations alone .* to CnnPolicy",
        ),
    ],
)
def test_unsupported_spaces_are_refused(observation_space, action_space, match):
    with pytest.raises(ValueError, match=match):
        TDMPC("MlpPolicy", SpacesEnv(observation_space, action_space), **TINY)


def test_unknown_metaworld_task_lists_close_matches():
    with pytest.raises(gym.error.NameNotFound, match="Did you mean: `reach`"):
        TDMPC("rech-v3")


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="optimize_memory_usage"):
        TDMPC("Pendulum-v1", optimize_memory_usage=True)
    # The planner's settings are TDMPC's arguments (the updates read gamma and horizon too): one place each.
    for key in ("gamma", "num_samples"):
        with pytest.raises(
            ValueError, match=f"policy_kwargs sets {key}: give the planner's settings as TDMPC's"
        ):
            TDMPC("Pendulum-v1", **{**TINY, "policy_kwargs": {**TINY_POLICY, key: 0.9}})

    class NoPriorities(ReplayBuffer):
        def sample_sequences(self, batch_size, horizon, env=None): ...

    for buffer_class in (ReplayBuffer, NoPriorities):  # updates need sequences and new priorities
        with pytest.raises(TypeError, match=r"sample_sequences\(\) and update_priorities\(\)"):
            TDMPC("Pendulum-v1", **TINY, replay_buffer_class=buffer_class)
    for name, value in (
        ("planning_iterations", 0),
        ("num_elites", 0),
        ("num_samples", 0),
        ("policy_fraction", 1.5),
        ("min_std", -0.1),
        ("batch_size", 0),
        ("horizon", 2.5),
        ("train_freq", 0),
        ("gamma", 1.5),
        ("tau", 2.0),
        ("rho", -1.0),
        ("temperature", 0.0),
        ("momentum", 1.0),
        ("max_grad_norm", 0.0),  # not "no clipping": the weights would never move
    ):
        with pytest.raises(ValueError, match=name):  # at construction, not after the seed phase
            TDMPC("Pendulum-v1", **{**TINY, name: value})
    with pytest.raises(ValueError, match="latent_dim must be >= 1"):
        TDMPC("Pendulum-v1", **{**TINY, "policy_kwargs": {**TINY_POLICY, "latent_dim": 0}})
    with pytest.raises(ValueError, match="target_update_interval must be >= 1"):
        TDMPC("Pendulum-v1", **TINY, target_update_interval=0)
    with pytest.raises(ValueError, match="buffer_size must be >= 1"):
        TDMPC("Pendulum-v1", **{**TINY, "buffer_size": 0})  # SB3 would make it 1
    model = TDMPC("Pendulum-v1", **{**TINY, "horizon": 10, "buffer_size": 10})  # fine to act with
    with pytest.raises(ValueError, match="holds 10 steps per env, too few for sequences of horizon 10"):
        model.learn(100)
    assert model.num_timesteps == 0


def test_a_model_loaded_to_act_needs_no_replay_buffer(tmp_path):
    model = TDMPC("Pendulum-v1", **TINY)
    model.save(tmp_path / "model")
    (tmp_path / "model").mkdir()  # the zoo's run folder holds reach-v3.zip beside a reach-v3/ folder
    loaded = TDMPC.load(tmp_path / "model", buffer_size=1)
    assert loaded.replay_buffer.buffer_size == 1
    obs = np.zeros((1, 3), dtype=np.float32)
    actions = []
    for m in (model, loaded):
        th.manual_seed(0)  # the planner samples
        actions.append(m.predict(obs, deterministic=True)[0])
    assert np.array_equal(*actions)


@pytest.mark.parametrize(
    ("kwargs", "stored"),
    [
        (dict(batch_size=64, learning_starts=20), 21),
        (dict(batch_size=64, buffer_size=40, learning_starts=100), 40),
    ],
)
def test_batch_larger_than_the_stored_transitions_is_refused_before_any_step(kwargs, stored):
    model = TDMPC("Pendulum-v1", **{**TINY, **kwargs})
    with pytest.raises(ValueError, match=rf"batch_size \(64\) is larger than the {stored} transitions"):
        model.learn(100)
    assert model.num_timesteps == 0


def test_the_batch_size_check_counts_every_env_and_train_samples_by_hand():
    # 4 envs: the first update comes after 13 env steps (52 > learning_starts 50), with 52 transitions.
    env = make_vec_env("Pendulum-v1", n_envs=4, seed=0)
    model = TDMPC("MlpPolicy", env, **{**TINY, "batch_size": 52, "seed_updates": 1})
    model.learn(60)
    assert model._n_updates == 3 and model.num_timesteps == 60  # at 52, 56 and 60 steps
    # Rollouts of 7 steps: the first update follows the 8th, at 56 transitions.
    with pytest.raises(ValueError, match=r"batch_size \(57\) is larger than the 56 transitions"):
        TDMPC("Pendulum-v1", **{**TINY, "batch_size": 57, "train_freq": 7}).learn(56)
    model_7 = TDMPC("Pendulum-v1", **{**TINY, "batch_size": 56, "train_freq": 7, "seed_updates": 1})
    model_7.learn(56)
    assert model_7._n_updates == 1
    # Episodic train_freq: what the first episodes store is not known in advance; nothing is refused.
    TDMPC("Pendulum-v1", **{**TINY, "batch_size": 100, "train_freq": (1, "episode")}).learn(1)
    # train() by hand samples whatever the buffer holds (with replacement, as TD-MPC), and raises when empty.
    model.train(3, batch_size=200)
    assert model._n_updates == 6
    fresh = TDMPC("Pendulum-v1", **TINY)
    fresh.set_logger(configure(None, []))  # what learn() sets up, as for SB3's own train()
    with pytest.raises(ValueError, match="Cannot sample from an empty replay buffer"):
        fresh.train(1, batch_size=16)


@pytest.fixture
def saved(tmp_path):
    model = seed_phase_model()
    model.learn(20)
    model.save(tmp_path / "model.zip")
    model.save_replay_buffer(tmp_path / "buffer.pkl")
    return model, tmp_path / "model.zip", tmp_path / "buffer.pkl"


def test_truncated_or_corrupted_checkpoint_names_the_file(saved, tmp_path):
    model, path, _ = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(truncated))} .*truncated or corrupted"):
        TDMPC.load(truncated)
    # One flipped byte inside the network parameters.
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("policy.pth")
    corrupted = tmp_path / "corrupted.zip"
    offset = info.header_offset + 30 + len(info.filename) + info.compress_size // 2  # inside its data
    corrupted.write_bytes(data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :])
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(corrupted))} is corrupted: member 'policy.pth' fails its CRC"
    ):
        TDMPC.load(corrupted)
    for member in ("policy.optimizer.pth", "policy.pi_optimizer.pth"):  # SB3 alone: a KeyError / ValueError
        lacking = tmp_path / f"without_{member}.zip"
        with zipfile.ZipFile(path) as archive, zipfile.ZipFile(lacking, "w") as copy:
            for info in archive.infolist():
                if info.filename != member:
                    copy.writestr(info, archive.read(info))
        with pytest.raises(
            CheckpointError, match=rf"without_{member}.zip is not a complete .* lacks {member}"
        ):
            TDMPC.load(lacking)
    with pytest.raises(CheckpointError, match="the checkpoint file is not a .*model checkpoint"):
        TDMPC.load(io.BytesIO(data[: len(data) // 2]))  # a file object: checked as well
    assert TDMPC.load(io.BytesIO(data)).num_timesteps == model.num_timesteps  # and a whole one loads


def test_truncated_or_inconsistent_buffer_names_the_file_and_keeps_the_current_buffer(saved, tmp_path):
    model, _, path = saved
    current = model.replay_buffer
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(truncated))} is not a readable replay buffer"
    ):
        model.load_replay_buffer(truncated)
    inconsistent = tmp_path / "inconsistent.pkl"
    current.tree.nodes[current.tree.n_leaves + 1500] = 5.0  # a priority on a transition never written
    inconsistent.write_bytes(pickle.dumps(current))
    current.tree.nodes[current.tree.n_leaves + 1500] = 0.0
    with pytest.raises(
        CheckpointError, match="Inconsistent replay buffer: priorities on transitions never written"
    ):
        model.load_replay_buffer(inconsistent)
    assert model.replay_buffer is current


def test_another_algorithms_checkpoint_is_refused(tmp_path):
    SAC("MlpPolicy", "Pendulum-v1", buffer_size=100).save(tmp_path / "sac.zip")
    with pytest.raises(CheckpointError, match=r"sac.zip is not a TD-MPC checkpoint: .*SACPolicy"):
        TDMPC.load(tmp_path / "sac.zip")
    with pytest.raises(ValueError, match="TDMPC needs a TDMPCPolicy .* got .*SACPolicy") as caught:
        TDMPC(SAC.policy_aliases["MlpPolicy"], "Pendulum-v1")
    assert not isinstance(caught.value, CheckpointError)  # no file involved


def test_checkpoint_or_buffer_of_other_spaces_is_refused(saved, tmp_path):
    model, path, buffer_path = saved
    other = make_vec_env("MountainCarContinuous-v0", seed=0)
    with pytest.raises(
        CheckpointError,
        match=rf"{re.escape(str(path))} cannot run on this environment: Observation spaces do not",
    ):
        TDMPC.load(path, env=other)
    with pytest.raises(CheckpointError, match="collected with observation space Box"):
        TDMPC("MlpPolicy", other, **TINY).load_replay_buffer(buffer_path)
    with pytest.raises(CheckpointError, match="stores 1 environment"):
        TDMPC("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2), **TINY).load_replay_buffer(buffer_path)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(saved, monkeypatch):
    model, path, buffer_path = saved
    before, buffer_before = path.read_bytes(), buffer_path.read_bytes()
    model.learn(10, reset_num_timesteps=False)  # the model changes after its last checkpoint

    def failing_save(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(th, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    monkeypatch.undo()
    model.replay_buffer.unpicklable = lambda: None  # pickling fails after the arrays were written
    with pytest.raises((pickle.PicklingError, AttributeError)):
        model.save_replay_buffer(buffer_path)
    del model.replay_buffer.unpicklable
    assert path.read_bytes() == before and buffer_path.read_bytes() == buffer_before
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "buffer.pkl",
        "model.zip",
    ]  # no temporary file left
    TDMPC.load(path).load_replay_buffer(buffer_path)


def test_a_process_killed_while_saving_leaves_the_previous_buffer_intact(tmp_path):
    path = tmp_path / "buffer.pkl"
    script = textwrap.dedent(
        f"""
        import os, signal
        from sb3_tdmpc import TDMPC

        class KillWhilePickled:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)

        model = TDMPC("Pendulum-v1", buffer_size=5000, policy_kwargs=dict(mlp_dim=8, enc_dim=8))
        model.replay_buffer.rewards[:] = 1.0
        model.save_replay_buffer({str(path)!r})
        model.replay_buffer.rewards[:] = 123.0
        model.replay_buffer.zzz = KillWhilePickled()  # pickled last, after every array
        model.save_replay_buffer({str(path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    model = TDMPC("Pendulum-v1", buffer_size=5000)
    model.load_replay_buffer(path)
    assert np.all(model.replay_buffer.rewards == 1.0)


# --------------------------------------------------------------------------- 4. numerical faults


@pytest.fixture
def trained():
    model = TDMPC("Pendulum-v1", seed=0, **{**TINY, "learning_starts": 60})
    model.learn(80)
    return model


def snapshot(model):
    policy = model.policy
    return (
        {k: v.clone() for k, v in policy.state_dict().items()},
        [pickle.dumps(opt.state_dict()) for opt in (policy.optimizer, policy.pi_optimizer)],
        model.replay_buffer.tree.nodes.copy(),
    )


def assert_unchanged(model, before):
    params, optimizers, tree = before
    for name, value in model.policy.state_dict().items():
        assert th.equal(params[name], value), name
    policy = model.policy
    assert [pickle.dumps(opt.state_dict()) for opt in (policy.optimizer, policy.pi_optimizer)] == optimizers
    assert np.array_equal(model.replay_buffer.tree.nodes, tree)


def test_non_finite_loss_stops_training_naming_the_term_and_step_and_changes_nothing(trained):
    rb = trained.replay_buffer
    rb.rewards[: rb.pos] = np.nan  # bypasses _store_transition, which would refuse it
    before = snapshot(trained)
    updates = trained._n_updates
    with pytest.raises(
        FloatingPointError, match=rf"reward_loss, value_loss in gradient update {updates + 1} \(step 80\)"
    ) as error:
        trained.train(gradient_steps=1, batch_size=16)
    assert isinstance(error.value, ValueError)  # rl-zoo3's -optimize prunes ValueErrors
    assert_unchanged(trained, before)
    assert trained._n_updates == updates


def test_non_finite_gradient_is_caught_even_with_finite_losses(trained):
    before = snapshot(trained)
    trained.policy.model.reward[-1].weight.register_hook(lambda grad: grad * np.nan)
    with pytest.raises(FloatingPointError, match="Non-finite gradient in gradient update"):
        trained.train(gradient_steps=1, batch_size=16)
    assert_unchanged(trained, before)


def test_non_finite_policy_loss_leaves_the_policy_prior_unchanged(trained, monkeypatch):
    update_world_model = trained._update_world_model

    def nan_latents(data):
        stats, latents = update_world_model(data)
        return stats, latents * np.nan

    monkeypatch.setattr(trained, "_update_world_model", nan_latents)
    pi_before = [p.clone() for p in trained.policy.model.pi_net.parameters()]
    with pytest.raises(FloatingPointError, match="Non-finite pi_loss.*the policy prior was not changed"):
        trained.train(gradient_steps=1, batch_size=16)
    assert all(
        th.equal(a, b) for a, b in zip(pi_before, trained.policy.model.pi_net.parameters(), strict=True)
    )


def test_a_non_finite_loss_stops_training_even_where_its_gradient_is_finite():
    # Rewards of 1e20: the clamped loss gives a finite (zero) gradient, the loss itself is inf.
    env = make_vec_env(lambda: gym.wrappers.TransformReward(gym.make("Pendulum-v1"), lambda r: 1e20), seed=0)
    with pytest.raises(FloatingPointError, match="Non-finite reward_loss"):
        TDMPC("MlpPolicy", env, seed=0, **TINY).learn(100)


def test_losses_over_the_clamp_are_logged_and_warned_about_once():
    # Rewards of 1e3: (R - r)^2 ~ 1e6 is over TD-MPC's 1e4 clamp, so the reward term gives no gradient.
    env = make_vec_env(lambda: gym.wrappers.TransformReward(gym.make("Pendulum-v1"), lambda r: 1e3), seed=0)
    model = TDMPC("MlpPolicy", env, seed=0, **TINY)
    logged = []
    clamp_warning = r"100\.0% of the sequences had a loss term over TD-MPC.s clamp"
    with pytest.warns(UserWarning, match=clamp_warning) as caught:
        model.learn(120, callback=LoggedFractions(logged))
    assert sum("clamp" in str(w.message) for w in caught) == 1  # once per model
    assert logged and all(fraction == 1.0 for fraction in logged)

    quiet = TDMPC("Pendulum-v1", seed=0, **TINY)
    quiet_logged = []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*TD-MPC's clamp")
        quiet.learn(120, callback=LoggedFractions(quiet_logged))
    assert quiet_logged and all(fraction == 0.0 for fraction in quiet_logged)


@pytest.mark.parametrize(("fraction", "warns"), [(0.3, False), (0.7, True)])
def test_the_clamp_warning_needs_most_sequences_over_it(trained, monkeypatch, fraction, warns):
    update_world_model = trained._update_world_model

    def with_fraction(data):
        stats, latents = update_world_model(data)
        return {**stats, "clamped_fraction": th.tensor(fraction)}, latents

    monkeypatch.setattr(trained, "_update_world_model", with_fraction)
    trained._warned_loss_clamp = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained.train(gradient_steps=1, batch_size=16)
    assert any("TD-MPC's clamp" in str(w.message) for w in caught) == warns
    assert trained.logger.name_to_value["train/clamped_fraction"] == pytest.approx(fraction)


class LoggedFractions(BaseCallback):
    """Collects train/clamped_fraction each time the logger holds it."""

    def __init__(self, fractions: list[float]):
        super().__init__()
        self.fractions = fractions

    def _on_step(self) -> bool:
        value = self.model.logger.name_to_value.get("train/clamped_fraction")
        if value is not None:
            self.fractions.append(value)
        return True


def test_a_learning_rate_schedule_that_turns_non_finite_stops_before_the_update():
    model = TDMPC(
        "Pendulum-v1", seed=0, **TINY, learning_rate=lambda progress: 1e-3 if progress > 0.5 else np.nan
    )
    with pytest.raises(ValueError, match="learning rate schedule returned nan .*no update was made"):
        model.learn(200)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


def test_only_dropped_transitions_give_a_clear_error():
    env = make_vec_env(lambda: FaultyEnv(nan_reward_at=range(1, 1000)), seed=0)
    model = TDMPC("MlpPolicy", env, seed=0, **TINY)
    with (
        pytest.raises(ValueError, match="every priority is 0 .*non-finite and dropped"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", NonFiniteTransitionWarning)
        model.learn(100)


def test_a_policy_saved_alone_is_named_as_such_by_tdmpc_load(tmp_path):
    TDMPC("Pendulum-v1", **TINY).policy.save(tmp_path / "policy.zip")
    with pytest.raises(CheckpointError, match="a policy saved alone .* MlpPolicy.load"):
        TDMPC.load(tmp_path / "policy.zip")


class FaultyEnv(gym.Wrapper):
    """Pendulum whose reward is NaN at some steps and whose observation blows up (inf) at others."""

    def __init__(self, nan_reward_at=(), inf_obs_at=()):
        super().__init__(gym.make("Pendulum-v1"))
        self.nan_reward_at, self.inf_obs_at, self.t = set(nan_reward_at), set(inf_obs_at), 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.t += 1
        if self.t in self.nan_reward_at:
            reward = float("nan")
        if self.t in self.inf_obs_at:
            obs = np.full_like(obs, np.inf)
        return obs, reward, terminated, truncated, info


def test_non_finite_rewards_and_observations_are_reported_not_stored():
    env = make_vec_env(lambda: FaultyEnv(nan_reward_at=(20, 75), inf_obs_at=(40,)), n_envs=1, seed=0)
    model = TDMPC("MlpPolicy", env, seed=0, **{**TINY, "learning_starts": 60})
    model.set_logger(configure(None, []))
    with pytest.warns(NonFiniteTransitionWarning) as record:
        model.learn(100)
    messages = [str(w.message) for w in record if issubclass(w.category, NonFiniteTransitionWarning)]
    assert len(messages) == 3
    assert messages[0].startswith(
        "Environment 0 returned a non-finite reward at step 20: the transition was not"
    )
    assert messages[1].startswith("Environment 0 returned a non-finite observation at step 40")
    assert "the environment is reset" in messages[1]
    assert messages[2].startswith("Environment 0 returned a non-finite reward at step 75")
    assert model.num_nonfinite_transitions == 3
    assert model.logger.name_to_value["rollout/nonfinite_transitions"] == 3

    rb = model.replay_buffer
    for field in ("observations", "next_observations", "rewards", "actions"):
        assert np.isfinite(getattr(rb, field)[: rb.pos]).all(), field
    for step in (20, 40, 75):  # step t is row t - 1
        assert rb.dones[step - 2, 0] == 1 and rb.timeouts[step - 2, 0] == 1  # episode closed before it
        assert rb.tree.get(step - 1) == 0.0  # the placeholder is never a sequence start
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    assert model._n_updates > 20  # training went on


class DictFaultyEnv(gym.ObservationWrapper):
    """FaultyEnv observed as a Dict of Boxes (as dm-control observes)."""

    def __init__(self, **faults):
        super().__init__(FaultyEnv(**faults))
        box = self.env.observation_space
        angle, speed = spaces.Box(box.low[:2], box.high[:2]), spaces.Box(box.low[2:], box.high[2:])
        self.observation_space = spaces.Dict(angle=angle, speed=speed)

    def observation(self, obs):
        return {"angle": obs[:2], "speed": obs[2:]}


def test_non_finite_data_that_cannot_be_dropped_stops_training():
    # Under VecNormalize the statistics have absorbed the value already.
    env = VecNormalize(make_vec_env(lambda: FaultyEnv(nan_reward_at=(20,)), seed=0))
    with pytest.raises(FloatingPointError, match="observation at step 20; with VecNormalize"):
        TDMPC("MlpPolicy", env, seed=0, **TINY).learn(100)
    # Dict observations (flattened by a VecEnv wrapper): a bad reward is dropped; a bad observation would need
    # one environment reset through that wrapper.
    env = make_vec_env(lambda: DictFaultyEnv(nan_reward_at=(20,)), seed=0)
    model = TDMPC("MlpPolicy", env, seed=0, **TINY)
    with pytest.warns(NonFiniteTransitionWarning, match="non-finite reward at step 20"):
        model.learn(100)
    assert model.num_nonfinite_transitions == 1 and np.isfinite(model.replay_buffer.rewards).all()
    env = make_vec_env(lambda: DictFaultyEnv(inf_obs_at=(20,)), seed=0)
    message = "cannot be reset through VecFlattenDictObservation"
    with pytest.raises(FloatingPointError, match=message), pytest.warns(NonFiniteTransitionWarning):
        TDMPC("MlpPolicy", env, seed=0, **TINY).learn(100)


def test_vec_normalize_over_dict_observations_asks_to_flatten_first():
    env = VecNormalize(make_vec_env(lambda: DictFaultyEnv(), seed=0))
    with pytest.raises(ValueError, match=r"VecNormalize\(VecFlattenDictObservation\(venv\)\)"):
        TDMPC("MlpPolicy", env, **TINY)
    env = VecNormalize(VecFlattenDictObservation(make_vec_env(lambda: DictFaultyEnv(), seed=0)))
    model = TDMPC("MlpPolicy", env, **TINY)
    model.learn(60)  # stores the flat raw observations, samples them normalised
    assert model.replay_buffer.observations.shape == (2000, 1, 3) and model._n_updates > 0


# --------------------------------------------------------------------------- the zoo's files


def run_zoo_train(*args):
    command = [sys.executable, "-m", "sb3_tdmpc.zoo", "train", "--algo", "tdmpc", "--env", "reach-v3", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


ZOO_PARAMS = [
    "-params",
    "policy_kwargs:dict(latent_dim=8,mlp_dim=32,enc_dim=16)",
    "num_samples:32",
    "num_elites:4",
    "planning_iterations:2",
    "horizon:3",
    "learning_starts:200",
    "seed_updates:5",
    "batch_size:16",
    "buffer_size:2000",
]


def test_zoo_save_replay_buffer_files_resume_exactly_and_train_i_continues_the_run(tmp_path):
    common = ["--seed", "1", "--num-threads", "1", "--eval-freq", "-1"]
    common = [*common, "--save-replay-buffer", *ZOO_PARAMS]
    run_zoo_train("-n", "500", "-f", str(tmp_path / "whole"), *common)  # two reach-v3 episodes
    split = tmp_path / "split"
    run_zoo_train("-n", "250", "-f", str(split), *common)
    first = split / "tdmpc" / "reach-v3_1"
    # The zoo's files hold the whole run state: the Python API continues the run exactly from them
    # (the environment replays the reset of the episode the run stopped at; the buffer matches).
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        model = TDMPC.load(first / "reach-v3.zip", env=make_vec_env("reach-v3", n_envs=1))
        model.load_replay_buffer(first / "replay_buffer.pkl")
        model.learn(10, reset_num_timesteps=False)
    assert model.num_timesteps == 260
    # So does the zoo's -i: 250 more steps from the saved run end bitwise as the 500-step run.
    result = run_zoo_train("-i", str(first / "reach-v3.zip"), "-n", "250", "-f", str(split), *common)
    assert "Loading replay buffer" in result.stdout
    assert "ResumeWarning" not in result.stderr
    runs = [split / "tdmpc" / "reach-v3_2", tmp_path / "whole" / "tdmpc" / "reach-v3_1"]
    continued, whole = (TDMPC.load(run / "reach-v3.zip") for run in runs)
    for model, run in zip((continued, whole), runs, strict=True):
        model.load_replay_buffer(run / "replay_buffer.pkl")
    assert continued.num_timesteps == 500 and continued._n_updates > 250
    assert_same_state(continued, whole)
