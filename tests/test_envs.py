import importlib
import os
import subprocess
import sys
import warnings

import gymnasium as gym
import metaworld
import mujoco
import numpy as np
import pytest
from conftest import gl_context_error
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.monitor import Monitor

from sb3_tdmpc.envs.dmc import make_dmc_env
from sb3_tdmpc.envs.metaworld import (
    DEFAULT_CAMERA,
    METAWORLD_TASKS,
    ActionRepeat,
    EpisodeSuccess,
    make_metaworld_env,
    register_metaworld_envs,
)

EPISODE_SIM_STEPS = 500


def reach_action(obs: np.ndarray) -> np.ndarray:
    """P-controller driving the hand (obs[:3]) to the reach goal (obs[-3:])."""
    action = np.zeros(4, dtype=np.float32)
    action[:3] = np.clip(10.0 * (obs[-3:] - obs[:3]), -1.0, 1.0)
    return action


def run_episode(env: gym.Env, actions: np.ndarray, seed: int) -> tuple[np.ndarray, list, list]:
    obs, _ = env.reset(seed=seed)
    observations, rewards, dones = [obs], [], []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        dones.append((terminated, truncated))
        if terminated or truncated:
            break
    return np.array(observations), rewards, dones


@pytest.fixture(scope="module")
def reach_env():
    """``gym.make("reach-v3")`` with the defaults; every test using it resets it with a seed."""
    env = gym.make("reach-v3")
    yield env
    env.close()


def test_all_mt1_tasks_registered():
    assert len(METAWORLD_TASKS) == 50
    assert list(METAWORLD_TASKS) == sorted(metaworld.MT1.ENV_NAMES)
    assert all(name.endswith("-v3") for name in METAWORLD_TASKS)
    specs = {name: gym.spec(name) for name in METAWORLD_TASKS}
    for name, spec in specs.items():
        assert spec.entry_point == "sb3_tdmpc.envs.metaworld:make_metaworld_env"
        assert spec.kwargs == {"task": name}
        assert spec.max_episode_steps is None
    register_metaworld_envs()  # idempotent: existing ids are kept
    assert all(gym.spec(name) is spec for name, spec in specs.items())


def test_importing_envs_registers_ids(monkeypatch):
    import sb3_tdmpc.envs

    for name in METAWORLD_TASKS:
        monkeypatch.delitem(gym.registry, name)
    importlib.reload(sb3_tdmpc.envs)
    assert set(METAWORLD_TASKS) <= gym.registry.keys()


@pytest.mark.parametrize("task", ["reach-v3", "push-v3", "door-open-v3"])
def test_make_and_spaces(task):
    env = gym.make(task)
    sawyer = env.unwrapped.sawyer_observation_space
    space = env.observation_space
    assert isinstance(space, gym.spaces.Box)
    assert space.shape == (39,) and space.dtype == np.float32
    np.testing.assert_array_equal(space.low, sawyer.low.astype(np.float32))
    np.testing.assert_array_equal(space.high, sawyer.high.astype(np.float32))
    # The goal bounds are the real (finite, non-degenerate) ones, not Meta-World's stale zeros.
    assert np.all(np.isfinite(space.low[-3:])) and np.all(space.low[-3:] < space.high[-3:])
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs in space
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs.dtype == np.float32 and obs in space
    assert isinstance(reward, float) and not terminated and not truncated
    assert {"success", "is_success"} <= info.keys()
    assert env.spec.id == task
    env.close()


def test_gym_make_defaults_run_to_truncation(reach_env):
    env = reach_env
    assert env.get_wrapper_attr("action_repeat") == 2
    assert env.spec.max_episode_steps == EPISODE_SIM_STEPS // 2
    assert env.metadata["render_fps"] == 80 / 2
    env.reset(seed=1)
    for step in range(1, EPISODE_SIM_STEPS // 2 + 1):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        assert not terminated
        assert truncated == (step == EPISODE_SIM_STEPS // 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # infinite object bounds, wrapped env: expected
        check_env(env, skip_render_check=True)


@pytest.mark.parametrize("action_repeat", [0, -1, 1.5, float("nan"), "tdmpc", None, True])
def test_action_repeat_validation(action_repeat):
    with pytest.raises(ValueError, match="action_repeat"):
        ActionRepeat(gym.make("Pendulum-v1"), action_repeat)


def test_action_repeat_sums_rewards_and_truncates(reach_env):
    rng = np.random.default_rng(0)
    repeat = 2
    agent_actions = rng.uniform(-1, 1, size=(EPISODE_SIM_STEPS // repeat, 4)).astype(np.float32)
    single = make_metaworld_env("reach-v3", action_repeat=1)
    repeated = reach_env

    sim_actions = np.repeat(agent_actions, repeat, axis=0)
    obs_single, rewards_single, dones_single = run_episode(single, sim_actions, seed=7)
    obs_repeat, rewards_repeat, dones_repeat = run_episode(repeated, agent_actions, seed=7)

    assert len(rewards_single) == EPISODE_SIM_STEPS
    assert len(rewards_repeat) == EPISODE_SIM_STEPS // repeat
    assert dones_repeat[-1] == (False, True) and dones_single[-1] == (False, True)
    assert not any(any(done) for done in dones_repeat[:-1])
    inner_rewards = np.reshape(rewards_single, (-1, repeat))
    np.testing.assert_allclose(rewards_repeat, inner_rewards.sum(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(obs_repeat, obs_single[::repeat])
    # The reward really is a sum, not the last inner reward.
    assert not np.allclose(rewards_repeat, inner_rewards[:, -1])
    single.close()


def test_action_repeat_override_not_dividing_episode_length():
    env = gym.make("reach-v3", action_repeat=3)
    assert env.get_wrapper_attr("action_repeat") == 3
    assert env.spec.max_episode_steps == -(-EPISODE_SIM_STEPS // 3)
    env.reset(seed=0)
    steps, truncated = 0, False
    while not truncated:
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        steps += 1
        assert not terminated
    assert steps == -(-EPISODE_SIM_STEPS // 3)  # the last agent step stops after the 500th sim step
    assert env.unwrapped.curr_path_length == EPISODE_SIM_STEPS
    env.close()


def test_is_success_any_step_and_monitor(reach_env):
    env = Monitor(reach_env, info_keywords=("is_success",))
    obs, _ = env.reset(seed=0)
    reached_at = None
    for step in range(EPISODE_SIM_STEPS):
        obs, _, terminated, truncated, info = env.step(reach_action(obs))
        if reached_at is None:
            assert info["is_success"] == bool(info["success"])
            if info["success"]:
                reached_at = step
        else:
            assert info["is_success"] is True
        if reached_at is not None and step == reached_at + 20:
            break
    assert reached_at is not None and reached_at > 0
    # Move away: no longer successful at this step, but the episode was.
    while not (terminated or truncated):
        obs, _, terminated, truncated, info = env.step(-reach_action(obs))
    assert not info["success"]
    assert info["is_success"] is True
    assert info["episode"]["is_success"] is True
    assert info["episode"]["l"] == EPISODE_SIM_STEPS // 2

    # Reset clears it; standing still never reaches the goal.
    env.reset(seed=0)
    truncated = False
    while not truncated:
        _, _, _, truncated, info = env.step(np.zeros(4, dtype=np.float32))
        assert info["is_success"] is False
    assert info["episode"]["is_success"] is False


def test_is_success_counts_inner_steps_under_action_repeat(reach_env, monkeypatch):
    env = reach_env
    base = env.unwrapped
    evaluate_state = base.evaluate_state

    def succeed_only_at_third_sim_step(obs, action):
        reward, info = evaluate_state(obs, action)
        return reward, {**info, "success": float(base.curr_path_length == 3)}

    monkeypatch.setattr(base, "evaluate_state", succeed_only_at_third_sim_step)
    env.reset(seed=0)
    zero = np.zeros(4, dtype=np.float32)
    _, _, _, _, info = env.step(zero)  # sim steps 1, 2
    assert info["is_success"] is False
    _, _, _, _, info = env.step(zero)  # sim steps 3 (success), 4 (last info returned)
    assert info["success"] == 0.0 and info["is_success"] is True
    _, _, _, _, info = env.step(zero)
    assert info["is_success"] is True


def test_episode_success_wrapper_resets():
    class Blinking(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (1,))
        action_space = gym.spaces.Box(-1, 1, (1,))

        def reset(self, *, seed=None, options=None):
            self.t = 0
            return np.zeros(1, dtype=np.float32), {}

        def step(self, action):
            self.t += 1
            return np.zeros(1, dtype=np.float32), 0.0, False, self.t == 4, {"success": self.t == 2}

    env = EpisodeSuccess(Blinking())
    env.reset()
    assert [env.step(0)[-1]["is_success"] for _ in range(4)] == [False, True, True, True]
    env.reset()
    assert env.step(0)[-1]["is_success"] is False


def test_seeded_resets_are_reproducible(reach_env):
    # As Stable-Baselines3 does it: no seed at construction, seeded resets.
    env, other = reach_env, gym.make("reach-v3")
    actions = np.random.default_rng(1).uniform(-1, 1, size=(60, 4)).astype(np.float32)

    first, _ = env.reset(seed=5)
    env.step(actions[0])
    env.reset()  # advances the goal RNG
    again, _ = env.reset(seed=5)
    np.testing.assert_array_equal(first, again)

    obs_a, rewards_a, _ = run_episode(env, actions, seed=11)
    obs_b, rewards_b, _ = run_episode(other, actions, seed=11)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rewards_a, rewards_b)

    goals = {tuple(env.reset(seed=seed)[0][-3:]) for seed in range(5)}
    assert len(goals) == 5
    # Without a seed, every reset draws a new goal.
    unseeded = {tuple(env.reset()[0][-3:]) for _ in range(5)}
    assert len(unseeded) > 1
    other.close()


def test_constructor_seed_sets_goal_set_and_first_episode(reach_env):
    global_state = np.random.get_state()[1].copy()  # noqa: NPY002 (Meta-World uses the global RNG)
    seeded = make_metaworld_env("reach-v3", seed=1)
    np.testing.assert_array_equal(np.random.get_state()[1], global_state)  # noqa: NPY002 (left untouched)
    # The constructor seed also seeds the first (unseeded) reset.
    first, _ = seeded.reset()
    np.testing.assert_array_equal(first, seeded.reset(seed=1)[0])
    # Another goal set: the goals of seed 1's set differ from seed 0's set.
    goals_1 = {tuple(seeded.reset(seed=seed)[0][-3:]) for seed in range(3)}
    goals_0 = {tuple(reach_env.reset(seed=seed)[0][-3:]) for seed in range(3)}
    assert goals_1.isdisjoint(goals_0)
    seeded.close()


def test_unknown_task_lists_close_matches():
    with pytest.raises(ValueError, match=r"Unknown Meta-World task 'reach-v2'\. Did you mean: reach-v3"):
        make_metaworld_env("reach-v2")
    with pytest.raises(ValueError, match="door-open-v3"):
        make_metaworld_env("door-opne-v3")
    with pytest.raises(ValueError, match="Known tasks: assembly-v3"):
        make_metaworld_env("zzz")
    with pytest.raises(ValueError, match=r"DeepMind Control task 'walker-wlak'\. Did you mean: walker-walk"):
        make_dmc_env("walker-wlak")


def test_unknown_dmc_task_is_named_without_dm_control(monkeypatch):
    monkeypatch.setitem(sys.modules, "dm_control", None)  # an import of either would now fail
    monkeypatch.setitem(sys.modules, "shimmy", None)
    with pytest.raises(ValueError, match="Unknown DeepMind Control task 'walker-wlak'"):
        make_dmc_env("walker-wlak")


def test_corner_cameras_are_upright(reach_env):
    raw = metaworld.make_mt_envs("reach-v3", seed=0)
    raw.reset()
    reach_env.reset(seed=0)
    for name in ("corner", "corner2", "corner3", "corner4"):
        raw_id = mujoco.mj_name2id(raw.unwrapped.model, mujoco.mjtObj.mjOBJ_CAMERA, name)
        cam_id = mujoco.mj_name2id(reach_env.unwrapped.model, mujoco.mjtObj.mjOBJ_CAMERA, name)
        # Column 1 of cam_xmat is the camera's y axis, the image's "up", in world coordinates.
        assert raw.unwrapped.data.cam_xmat[raw_id].reshape(3, 3)[2, 1] < 0  # Meta-World: upside down
        assert reach_env.unwrapped.data.cam_xmat[cam_id].reshape(3, 3)[2, 1] > 0
        # Same viewpoint and viewing direction, only rolled.
        np.testing.assert_allclose(
            reach_env.unwrapped.data.cam_xpos[cam_id], raw.unwrapped.data.cam_xpos[raw_id], atol=1e-9
        )
        np.testing.assert_allclose(
            reach_env.unwrapped.data.cam_xmat[cam_id].reshape(3, 3)[:, 2],
            raw.unwrapped.data.cam_xmat[raw_id].reshape(3, 3)[:, 2],
            atol=1e-9,
        )
    raw.close()


def test_render_rgb_array():
    error = gl_context_error()
    if error is not None:
        pytest.skip(f"MuJoCo cannot create a GL context: {error}")
    env = gym.make("reach-v3", render_mode="rgb_array", width=96, height=64)
    assert env.unwrapped.mujoco_renderer.camera_id == mujoco.mj_name2id(
        env.unwrapped.model, mujoco.mjtObj.mjOBJ_CAMERA, DEFAULT_CAMERA
    )
    env.reset(seed=0)
    first = env.render()
    env.step(np.ones(4, dtype=np.float32))
    second = env.render()
    env.close()
    for frame in (first, second):
        assert frame.shape == (64, 96, 3) and frame.dtype == np.uint8
        assert frame.std() > 10  # not a blank image
    assert not np.array_equal(first, second)  # the arm moved


def test_a_renderer_left_open_exits_quietly():
    # MuJoCo's EGL display is terminated at exit before an open renderer frees its context, which then
    # prints EGLError tracebacks; CloseRendererAtExit closes it first (a pixel id renders every step).
    error = gl_context_error()
    if error is not None:
        pytest.skip(f"MuJoCo cannot create a GL context: {error}")
    script = (
        "import gymnasium as gym, sb3_tdmpc\n"
        "state = gym.make('reach-v3', render_mode='rgb_array', width=32, height=32)\n"
        "state.reset(seed=0); state.render()\n"
        "pixels = gym.make('reach-pixels-v3', image_size=32)\n"
        "pixels.reset(seed=0); pixels.step(pixels.action_space.sample())\n"
        "closed = gym.make('reach-v3', render_mode='rgb_array', width=32, height=32)\n"
        "closed.reset(seed=0); closed.render(); closed.close()\n"
        "print('done')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
    assert "Exception ignored" not in result.stderr and "EGLError" not in result.stderr, result.stderr
