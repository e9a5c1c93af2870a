"""DeepMind Control Suite tasks (states, Dict observations, action repeat) and pixel observations
(CnnPolicy, uint8 replay, random shift). Rendering tests skip where no headless renderer works."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import TINY, gl_context_error
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

import sb3_tdmpc  # noqa: F401  (registers the ids)
from sb3_tdmpc import TDMPC
from sb3_tdmpc.envs import dmc
from sb3_tdmpc.envs.dmc import DMC_TASKS, make_dmc_env, tdmpc_action_repeat
from sb3_tdmpc.envs.wrappers import (
    FlattenDictObservation,
    PixelObservation,
    VecFlattenDictObservation,
    flatten_dict_observation,
)
from sb3_tdmpc.tdmpc.policies import CnnPolicy, MlpPolicy, PixelEncoder, RandomShift

pytest.importorskip("dm_control")
pytest.importorskip("shimmy")

# Light pixel settings: the conv encoder dominates the cost of an update.
TINY_PIXELS = {
    **TINY,
    "policy_kwargs": dict(latent_dim=8, mlp_dim=32, num_channels=8),
    "batch_size": 8,
    "learning_starts": 100,
    "train_freq": 10,
    "horizon": 2,
}


class ImageEnv(gym.Env):
    """A channels-first uint8 image env that needs no renderer."""

    metadata = {"render_modes": ["rgb_array"]}
    observation_space = spaces.Box(0, 255, (9, 84, 84), np.uint8)
    action_space = spaces.Box(-1, 1, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), float(action[0]), False, False, {}


class DictEnv(gym.Env):
    observation_space = spaces.Dict(
        {"b": spaces.Box(-np.inf, np.inf, (2,), np.float64), "a": spaces.Box(-np.inf, np.inf, (), np.float64)}
    )
    action_space = spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        return {"a": np.array(1.0), "b": np.array([2.0, 3.0])}, {}

    def step(self, action):
        return {"a": np.array(1.0), "b": np.array([2.0, 3.0])}, 0.0, False, False, {}


@pytest.fixture(scope="module")
def renderer():
    """Skip unless MuJoCo renders off-screen here (MUJOCO_GL=egl, set by conftest): checked by MuJoCo
    and dm-control alone, so that an error of this package's pixel code fails the tests instead."""
    error = gl_context_error()
    if error is None:
        try:
            from dm_control import suite

            suite.load("cartpole", "swingup").physics.render(8, 8, camera_id=0)
        except Exception as dmc_error:  # dm-control's own GL context
            error = repr(dmc_error)
    if error is not None:
        pytest.skip(f"no off-screen renderer: {error}")


# --------------------------------------------------------------------------- DMC ids and wrappers


def test_dmc_tasks_match_the_suite():
    from dm_control import suite

    assert tuple(f"{domain}-{task}" for domain, task in suite.ALL_TASKS) == DMC_TASKS
    for task in ("walker-walk", "cheetah-run", "cartpole-swingup", "reacher-easy", "finger-spin"):
        assert gym.spec(f"dmc/{task}-v0").kwargs == {"task": task, "from_pixels": False}
        assert gym.spec(f"dmc/{task}-pixels-v0").kwargs == {"task": task, "from_pixels": True}
    with pytest.raises(ValueError, match="walker-walk"):
        make_dmc_env("walker-wlak")


def test_flatten_dict_observations():
    space = DictEnv.observation_space
    obs = {"b": np.array([2.0, 3.0]), "a": np.array(1.0)}
    # The space's key order (sorted: a, b), whatever the observation's order; scalars become one entry.
    np.testing.assert_array_equal(flatten_dict_observation(space, obs), [1.0, 2.0, 3.0])
    batch = {"a": np.array([1.0, 4.0]), "b": np.array([[2.0, 3.0], [5.0, 6.0]])}
    flat = flatten_dict_observation(space, batch)
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])

    env = FlattenDictObservation(DictEnv())
    assert env.observation_space == spaces.Box(-np.inf, np.inf, (3,), np.float32)
    assert env.reset()[0] in env.observation_space

    # TDMPC flattens a Dict env itself, and predict() flattens a raw Dict observation the same way.
    model = TDMPC("MlpPolicy", DictEnv(), **TINY)
    assert isinstance(model.get_env(), VecFlattenDictObservation)
    assert model.observation_space == spaces.Box(-np.inf, np.inf, (3,), np.float32)
    assert model.dict_observation_space == space
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == (1,)


def test_action_repeat_per_domain():
    assert dmc.DEFAULT_ACTION_REPEAT == 2
    assert [tdmpc_action_repeat(t) for t in ("walker-walk", "finger-spin", "cartpole-swingup")] == [2, 2, 8]
    assert tdmpc_action_repeat("cheetah-run") == tdmpc_action_repeat("quadruped-walk") == 4
    assert tdmpc_action_repeat("humanoid-walk") == tdmpc_action_repeat("dog-run") == 2
    env = gym.make("dmc/cartpole-swingup-v0", action_repeat="tdmpc")
    assert env.get_wrapper_attr("action_repeat") == 8
    assert gym.make("dmc/cartpole-swingup-v0").get_wrapper_attr("action_repeat") == 2
    assert env.observation_space == spaces.Box(-np.inf, np.inf, (5,), np.float32)
    assert env.action_space.dtype == np.float32
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs, gym.make("dmc/cartpole-swingup-v0").reset(seed=0)[0])
    steps, done = 0, False
    while not done:
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        steps, done = steps + 1, terminated or truncated
    assert obs.dtype == np.float32 and not terminated
    assert steps == 1000 // 8  # dm-control episodes: 1000 simulator steps


def test_missing_dm_control_gives_install_hint(monkeypatch):
    import sys

    for env_id in [k for k in gym.registry if k.startswith("dm_control/")]:
        monkeypatch.delitem(gym.registry, env_id)
    monkeypatch.setitem(sys.modules, "shimmy", None)
    with pytest.raises(ImportError, match=r"sb3-tdmpc\[dmc\]"):
        make_dmc_env("walker-walk")


def test_dmc_id_trains_and_evaluates_on_the_raw_env(tmp_path):
    model = TDMPC("MlpPolicy", "dm_control/cartpole-swingup-v0", seed=0, **{**TINY, "train_freq": 2})
    assert model.observation_space == spaces.Box(-np.inf, np.inf, (5,), np.float32)
    model.learn(300)
    assert model._n_updates > 0
    # The raw shimmy env (Dict observations, no action repeat), limited to keep the test short.
    raw = gym.wrappers.TimeLimit(gym.make("dm_control/cartpole-swingup-v0"), 50)
    mean_reward, _ = evaluate_policy(model, raw, n_eval_episodes=1, warn=False)
    assert np.isfinite(mean_reward)
    # Loaded without an env, the model still flattens raw Dict observations.
    model.save(tmp_path / "state")
    loaded = TDMPC.load(tmp_path / "state")
    assert loaded.dict_observation_space == model.dict_observation_space
    obs, _ = raw.reset(seed=0)
    assert loaded.predict(obs, deterministic=True)[0].shape == (1,)


# --------------------------------------------------------------------------- pixels


def test_pixel_encoder_is_tdmpcs():
    space = spaces.Box(0, 255, (9, 84, 84), np.uint8)
    encoder = PixelEncoder(space, latent_dim=50)
    convs = [m for m in encoder.convs if isinstance(m, th.nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [7, 5, 3, 3]
    assert all(c.stride == (2, 2) and c.out_channels == 32 for c in convs)
    assert convs[0].in_channels == 9 and encoder.linear.in_features == 32 * 3 * 3
    assert all(th.count_nonzero(c.bias) == 0 for c in convs)
    images = th.randint(0, 256, (2, 5, 9, 84, 84), dtype=th.uint8)
    z = encoder(images)
    assert z.shape == (2, 5, 50)
    th.testing.assert_close(encoder(images.float()), z)  # uint8 and float frames encode alike


def test_random_shift():
    th.manual_seed(0)
    images = th.randint(0, 256, (2, 3, 9, 84, 84), dtype=th.uint8)
    shifted = RandomShift(pad=4)(images)
    assert shifted.shape == images.shape and shifted.dtype == th.float32
    assert not th.equal(shifted, images.float())
    # Each image is the replicate-padded input cropped at an integer offset of 0-8 pixels (to within
    # grid_sample's float rounding).
    padded = th.nn.functional.pad(images.reshape(-1, 9, 84, 84).float(), (4,) * 4, mode="replicate")
    offsets = []
    for image, pad in zip(shifted.reshape(-1, 9, 84, 84), padded, strict=True):
        crops = {(dy, dx): pad[:, dy : dy + 84, dx : dx + 84] for dy in range(9) for dx in range(9)}
        offsets += [offset for offset, crop in crops.items() if th.allclose(image, crop, rtol=0, atol=0.01)]
    assert len(offsets) == 6 and len(set(offsets)) > 1
    # Images of one batch get their own shifts.
    same = images[:1, :1].expand(1, 16, 9, 84, 84)
    out = RandomShift(pad=4)(same)
    assert len({tuple(o.flatten()[:2000].tolist()) for o in out[0]}) > 1

    states = th.randn(4, 3)
    assert TDMPC("MlpPolicy", "Pendulum-v1", **TINY).policy.augment(states) is states


def test_policy_and_observation_space_mismatch():
    with pytest.raises(ValueError, match="use CnnPolicy"):
        TDMPC("MlpPolicy", ImageEnv(), **TINY)
    with pytest.raises(ValueError, match="use MlpPolicy"):
        TDMPC("CnnPolicy", "Pendulum-v1", **TINY)
    assert TDMPC.policy_aliases["CnnPolicy"] is CnnPolicy and TDMPC.policy_aliases["MlpPolicy"] is MlpPolicy
    # An id alone picks the policy from the observations, as TDMPC("reach-v3") does.
    if "TestImageEnv-v0" not in gym.registry:
        gym.register("TestImageEnv-v0", entry_point=ImageEnv)
    assert type(TDMPC("TestImageEnv-v0", **TINY).policy) is CnnPolicy
    assert type(TDMPC("Pendulum-v1", **TINY).policy) is MlpPolicy


@pytest.mark.parametrize(
    ("shape", "policy_kwargs", "match"),
    [
        ((3, 64, 96), {}, r"random shift augmentation needs square images, got 64x96: .*shift_pad=0"),
        ((3, 32, 32), {}, "need images of at least 39x39 pixels, got 32x32"),
        ((3, 64, 96), {"shift_pad": 0}, None),  # no augmentation: any size the convolutions take
    ],
)
def test_cnn_policy_checks_the_image_size_at_construction(shape, policy_kwargs, match):
    PixelEncoder(spaces.Box(0, 255, (3, 39, 39), np.uint8), 8)  # the smallest its convolutions take
    with pytest.raises(ValueError, match="at least 39x39 pixels, got 38x38"):
        PixelEncoder(spaces.Box(0, 255, (3, 38, 38), np.uint8), 8)
    env = ImageEnv()
    env.observation_space = spaces.Box(0, 255, shape, np.uint8)
    kwargs = {**TINY_PIXELS, "policy_kwargs": {**TINY_PIXELS["policy_kwargs"], **policy_kwargs}}
    if match is None:
        TDMPC("CnnPolicy", env, **kwargs)
    else:
        with pytest.raises(ValueError, match=match):  # not after the seed phase, at the first update
            TDMPC("CnnPolicy", env, **kwargs)


def test_cnn_policy_trains_on_several_image_envs():
    # No renderer needed: random frames, two envs planned in one batch.
    env = make_vec_env(ImageEnv, n_envs=2, seed=0)
    model = TDMPC("CnnPolicy", env, seed=0, **{**TINY_PIXELS, "learning_starts": 40, "train_freq": 20})
    shifted = []  # the model update trains on randomly shifted frames (RandomShift), planning never
    model.policy.shift.register_forward_hook(lambda module, args, out: shifted.append(args[0].shape))
    model.learn(100)
    assert model._n_updates > 0 and model.replay_buffer.observations.dtype == np.uint8
    horizon, batch = model.horizon, model.batch_size
    assert shifted and all(shape == (horizon + 1, batch, 9, 84, 84) for shape in shifted)
    assert len(shifted) == model._n_updates
    actions, (plan_means,) = model.predict(env.reset(), deterministic=True)
    assert actions.shape == (2, 2) and plan_means.shape[0] == 2


def test_pixel_env_trains_with_cnn_policy(renderer, tmp_path):
    env = gym.make("dmc/cartpole-swingup-pixels-v0")
    assert env.observation_space == spaces.Box(0, 255, (9, 84, 84), np.uint8)
    assert env.action_space == spaces.Box(-1, 1, (1,), np.float32)  # dm-control's float64, as the state ids'
    model = TDMPC("CnnPolicy", env, seed=0, **TINY_PIXELS)
    assert model.get_env().observation_space == env.observation_space  # no VecTransposeImage
    model.learn(300)
    assert model._n_updates > 0

    buffer = model.replay_buffer
    assert buffer.observations.dtype == np.uint8 and buffer.next_observations.dtype == np.uint8
    assert buffer.observations.shape[2:] == (9, 84, 84)
    assert buffer.observations[: buffer.pos].max() > 0
    sample = buffer.sample_sequences(4, 2)
    assert sample.observations.dtype == th.uint8 and sample.observations.shape == (3, 4, 9, 84, 84)

    model.save(tmp_path / "pixels")
    loaded = TDMPC.load(tmp_path / "pixels", env=model.get_env())
    assert isinstance(loaded.policy, CnnPolicy) and loaded.policy.num_channels == 8
    for (name, param), (_, loaded_param) in zip(
        model.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True
    ):
        assert th.equal(param, loaded_param), name
    obs = model.get_env().reset()
    action, state = loaded.predict(obs, deterministic=True)
    assert action.shape == (1, 1) and state[0].shape[0] == 1


def test_metaworld_from_pixels(renderer):
    env = gym.make("reach-pixels-v3")
    assert env.observation_space == spaces.Box(0, 255, (9, 84, 84), np.uint8)
    obs, _ = env.reset(seed=0)
    assert obs in env.observation_space and obs.std() > 0
    first = obs[-3:]
    obs, _, _, _, info = env.step(env.action_space.sample())
    assert obs.shape == (9, 84, 84) and "is_success" in info
    # Channels-first (C, H, W) stacks of the rendered (H, W, C) frames, the newest last.
    wrapper = env
    while not isinstance(wrapper, PixelObservation):
        wrapper = wrapper.env
    np.testing.assert_array_equal(obs[-3:], wrapper.env.render().transpose(2, 0, 1))  # the frame it rendered
    np.testing.assert_array_equal(obs[3:6], first)
    env.close()


def test_pixel_observation_needs_rgb_render():
    with pytest.raises(ValueError, match="rgb_array"):
        PixelObservation(gym.make("Pendulum-v1"))


def test_dmc_hyperparams():
    import pathlib

    import yaml

    path = pathlib.Path(__file__).parents[1] / "hyperparams" / "tdmpc.yml"
    entries = yaml.safe_load(path.read_text())
    templates = {"default"}
    assert not set(entries) - templates - set(gym.registry), "unregistered ids"
    tasks = ["walker-walk", "cheetah-run", "cartpole-swingup", "reacher-easy", "finger-spin"]
    tasks.append("quadruped-walk")
    for env_id in tasks:
        state, pixels = entries[f"dmc/{env_id}-v0"], entries[f"dmc/{env_id}-pixels-v0"]
        assert state["policy"] == "MlpPolicy" and state["env_kwargs"] == {"action_repeat": 2}
        assert pixels["policy"] == "CnnPolicy" and pixels["env_kwargs"] == {"action_repeat": 2}
        assert pixels["learning_rate"] == 3e-4 and pixels["batch_size"] == 256
    # TD-MPC's own settings for Humanoid and Dog (cfgs/tasks/humanoid.yaml, dog.yaml)
    for task in ("humanoid-stand", "humanoid-walk", "humanoid-run"):
        params = entries[f"dmc/{task}-v0"]
        assert params["planning_iterations"] == 12 and params["n_timesteps"] * 2 == 3_000_000
        assert "latent_dim=100" in params["policy_kwargs"] and params["learning_rate"] == 1e-3
    for task in ("dog-stand", "dog-walk", "dog-trot", "dog-run", "dog-fetch"):
        params = entries[f"dmc/{task}-v0"]
        assert params["planning_iterations"] == 8 and params["n_timesteps"] * 2 == 5_000_000
        assert params["batch_size"] == 2048 and params["learning_rate"] == 3e-4
        assert "latent_dim=100" in params["policy_kwargs"] and params["env_kwargs"] == {"action_repeat": 2}
    for env_id, params in entries.items():
        if params.get("policy") == "CnnPolicy":
            # obs + next_obs of (9, 84, 84) uint8 frames must fit a 24 GB machine.
            assert 2 * 9 * 84 * 84 * params["buffer_size"] < 24e9, env_id
