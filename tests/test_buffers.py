import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.save_util import load_from_pkl, save_to_pkl
from stable_baselines3.common.utils import set_random_seed

from sb3_tdmpc.common.buffers import PrioritizedReplayBuffer, SumTree

# --------------------------------------------------------------------------- SumTree


def _internal_nodes_are_sums(tree: SumTree) -> bool:
    n = tree.n_leaves
    nodes = tree.nodes
    return bool(np.array_equal(nodes[1:n], nodes[2 : 2 * n : 2] + nodes[3 : 2 * n : 2]))


def test_sumtree_sampling_frequencies_match_priorities():
    rng = np.random.default_rng(0)
    priorities = np.array([1.0, 0.0, 2.0, 5.0, 0.5, 0.0, 3.0, 1.5, 0.0, 7.0])  # 10 leaves: padded to 16
    tree = SumTree(len(priorities))
    tree.update(np.arange(len(priorities)), priorities)

    n_draws = 200_000
    leaves = tree.find(rng.uniform(0.0, tree.total, size=n_draws))
    freqs = np.bincount(leaves, minlength=len(priorities)) / n_draws

    assert leaves.max() < len(priorities)
    assert np.all(freqs[priorities == 0] == 0)
    # Binomial std of each frequency is below 0.0012: 0.006 is a 5-sigma band.
    np.testing.assert_allclose(freqs, priorities / priorities.sum(), atol=0.006)


def test_sumtree_find_is_exact_at_boundaries():
    tree = SumTree(5)
    tree.update(np.arange(5), np.array([1.0, 2.0, 0.0, 3.0, 4.0]))  # cumsum 1, 3, 3, 6, 10
    u = np.array([0.0, 0.999, 1.0, 2.999, 3.0, 5.999, 6.0, 9.999])
    np.testing.assert_array_equal(tree.find(u), [0, 0, 1, 1, 3, 3, 4, 4])
    assert tree.find(np.array([[0.5, 3.5]])).shape == (1, 2)


def test_sumtree_stays_exact_after_random_updates_with_duplicates():
    rng = np.random.default_rng(1)
    capacity = 37
    tree = SumTree(capacity)
    expected = np.zeros(capacity)
    for _ in range(300):
        idx = rng.integers(0, capacity, size=rng.integers(1, 60))  # plenty of duplicates
        values = rng.exponential(size=idx.size) * 10.0 ** rng.integers(-8, 8, size=idx.size)
        tree.update(idx, values)
        for i, v in zip(idx, values, strict=True):  # reference: sequential writes, last one wins
            expected[i] = v
        assert _internal_nodes_are_sums(tree)
    np.testing.assert_array_equal(tree.get(np.arange(capacity)), expected)
    np.testing.assert_array_equal(tree.nodes[tree.n_leaves + capacity :], 0.0)
    assert np.isclose(tree.total, np.sum(expected), rtol=1e-12, atol=0.0)


def test_sumtree_duplicate_indices_last_write_wins():
    tree = SumTree(4)
    tree.update(np.array([3, 1, 3, 3]), np.array([1.0, 2.0, 5.0, 7.0]))
    np.testing.assert_array_equal(tree.get(np.arange(4)), [0.0, 2.0, 0.0, 7.0])
    assert tree.total == 9.0


def test_sumtree_find_never_returns_zero_mass_leaf():
    rng = np.random.default_rng(2)
    # Wildly different magnitudes make round-off visible; the last real leaves and the padding
    # (capacity 11 -> 16 leaves) are empty, which is where an unguarded descent falls off the edge.
    values = np.array([1e16, 0.0, 1.0, 0.0, 3e-9, 0.0, 1e8, 0.1, 0.0, 0.0, 0.0])
    tree = SumTree(len(values))
    tree.update(np.arange(len(values)), values)
    total = tree.total
    u = np.concatenate(
        [
            rng.uniform(0.0, total, size=100_000),
            np.linspace(0.0, total, 10_001),
            [total, np.nextafter(total, 0.0), np.nextafter(total, np.inf), 2 * total, -1.0],
            np.cumsum(values),
        ]
    )
    leaves = tree.find(u)
    assert leaves.min() >= 0 and leaves.max() < len(values)
    assert np.all(tree.get(leaves) > 0)

    # Just below the total, fl(u - 0.3) >= 0.7: a descent on "u >= left" alone ends at leaf 3.
    tree = SumTree(4)
    tree.update(np.arange(4), np.array([0.3, 0.0, 0.7, 0.0]))
    u = np.array([np.nextafter(tree.total, 0.0), tree.total, 2.0])
    np.testing.assert_array_equal(tree.find(u), [2, 2, 2])


def test_sumtree_rejects_bad_input():
    tree = SumTree(3)
    with pytest.raises(ValueError):
        tree.find(np.array([0.0]))  # no mass yet
    with pytest.raises(IndexError):
        tree.update(np.array([3]), np.array([1.0]))
    with pytest.raises(ValueError):
        tree.update(np.array([0]), np.array([np.nan]))


# --------------------------------------------------------------------------- PrioritizedReplayBuffer

OBS_SPACE = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
ACT_SPACE = spaces.Box(-1000.0, 1000.0, shape=(1,), dtype=np.float32)


def make_buffer(size: int, n_envs: int = 1, **kwargs) -> PrioritizedReplayBuffer:
    return PrioritizedReplayBuffer(size * n_envs, OBS_SPACE, ACT_SPACE, device="cpu", n_envs=n_envs, **kwargs)


def add_step(buf: PrioritizedReplayBuffer, step: int, terminated=None, truncated=None) -> None:
    """Step ``step`` in env ``e``: obs (e, step), next obs (e, step + 0.5), action -step, reward step."""
    n = buf.n_envs
    env_ids = np.arange(n, dtype=np.float32)
    terminated = np.zeros(n, bool) if terminated is None else np.asarray(terminated)
    truncated = np.zeros(n, bool) if truncated is None else np.asarray(truncated)
    buf.add(
        np.stack([env_ids, np.full(n, step)], axis=1).astype(np.float32),
        np.stack([env_ids, np.full(n, step + 0.5)], axis=1).astype(np.float32),
        np.full((n, 1), -step, dtype=np.float32),
        np.full(n, step, dtype=np.float32),
        terminated | truncated,
        [{"TimeLimit.truncated": bool(tr)} for tr in truncated],
    )


def sample_from(buf: PrioritizedReplayBuffer, leaf: int, horizon: int, batch_size: int = 4):
    """Sequences that all start at ``leaf``: every other leaf's mass is removed."""
    n_leaves = buf.tree.capacity
    buf.tree.update(np.arange(n_leaves), (np.arange(n_leaves) == leaf).astype(float))
    samples = buf.sample_sequences(batch_size, horizon)
    np.testing.assert_array_equal(samples.indices, leaf)
    return samples


def test_new_transitions_get_max_priority():
    buf = make_buffer(10, alpha=0.5, priority_eps=0.0)
    for step in range(3):
        add_step(buf, step)
    np.testing.assert_array_equal(buf.tree.get(np.arange(4)), [1.0, 1.0, 1.0, 0.0])

    buf.update_priorities(np.array([1]), np.array([9.0]))
    assert buf.max_priority == 9.0
    assert buf.tree.get(np.array([1]))[0] == 3.0
    buf.update_priorities(np.array([0]), np.array([4.0]))  # lower: max unchanged
    assert buf.max_priority == 9.0

    add_step(buf, 3)
    assert buf.tree.get(np.array([3]))[0] == 3.0


def test_update_priorities_changes_sampling_frequencies():
    set_random_seed(0)
    buf = make_buffer(10, alpha=1.0, priority_eps=0.0)
    for step in range(4):
        add_step(buf, step)
    n = 8_000
    counts = np.bincount(buf.sample_sequences(n, 1).indices, minlength=4)
    np.testing.assert_allclose(counts / n, 0.25, atol=0.01)  # equal priorities

    # Torch tensor of shape [B, 1], as a loss would come.
    buf.update_priorities(np.array([0, 1, 2, 3]), th.tensor([[1.0], [0.0], [3.0], [0.0]]))
    samples = buf.sample_sequences(n, 1)
    counts = np.bincount(samples.indices, minlength=4)
    np.testing.assert_allclose(counts / n, [0.25, 0.0, 0.75, 0.0], atol=0.01)
    # The indices are those of the sampled starts.
    np.testing.assert_array_equal(samples.observations[0, :, 1].numpy(), samples.indices)


def test_update_priorities_rejects_bad_priorities():
    buf = make_buffer(10)
    add_step(buf, 0)
    add_step(buf, 1)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError):
            buf.update_priorities(np.array([0, 1]), np.array([1.0, bad]))
    with pytest.raises(ValueError):
        buf.update_priorities(np.array([0, 1]), np.array([1.0]))
    assert buf.max_priority == 1.0


def test_sequences_respect_episode_ends_and_write_head():
    buf = make_buffer(20)
    for step in range(8):
        # Steps 0-2 end in a termination, steps 3-5 in a truncation, steps 6-7 go on.
        add_step(buf, step, terminated=[step == 2], truncated=[step == 5])

    s = sample_from(buf, leaf=1, horizon=4)
    np.testing.assert_array_equal(s.masks[:, 0, 0].numpy(), [1, 1, 0, 0])
    np.testing.assert_array_equal(s.terminals[:, 0, 0].numpy(), [0, 1, 0, 0])
    # observations[0] is the start, observations[t + 1] the next observation of transition t.
    np.testing.assert_array_equal(s.observations[:, 0, 1].numpy(), [1, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_array_equal(s.actions[:, 0, 0].numpy(), [-1, -2, -3, -4])
    np.testing.assert_array_equal(s.rewards[:, 0, 0].numpy(), [1, 2, 3, 4])

    # A truncation ends the sequence but is not a terminal.
    s = sample_from(buf, leaf=4, horizon=4)
    np.testing.assert_array_equal(s.masks[:, 0, 0].numpy(), [1, 1, 0, 0])
    np.testing.assert_array_equal(s.terminals[:, 0, 0].numpy(), [0, 0, 0, 0])
    assert s.observations[2, 0, 1].item() == 5.5  # the true final observation of the episode

    # Never past the write head (pos = 8): transitions 6 and 7 only.
    s = sample_from(buf, leaf=6, horizon=4)
    np.testing.assert_array_equal(s.masks[:, 0, 0].numpy(), [1, 1, 0, 0])

    assert s.observations.shape == (5, 4, 2) and s.observations.dtype == th.float32
    assert s.actions.shape == (4, 4, 1)
    assert s.rewards.shape == s.terminals.shape == s.masks.shape == (4, 4, 1)
    assert s.masks.dtype == s.terminals.dtype == th.float32
    assert s.weights.shape == (4,) and s.weights.dtype == th.float32
    assert s.indices.dtype == np.int64


def test_sequences_wrap_around_when_full():
    buf = make_buffer(5)
    for step in range(7):  # positions 0, 1 hold steps 5, 6; positions 2-4 hold steps 2-4; pos = 2
        add_step(buf, step)
    assert buf.full and buf.pos == 2

    def check(leaf: int, steps: list, masks: list) -> None:
        s = sample_from(buf, leaf=leaf, horizon=4)
        np.testing.assert_array_equal(s.masks[:, 0, 0].numpy(), masks)
        valid = np.array(masks, bool)
        np.testing.assert_array_equal(s.observations[0, 0, 1].item(), steps[0])
        np.testing.assert_array_equal(s.observations[1:, 0, 1].numpy()[valid], np.array(steps)[valid] + 0.5)
        np.testing.assert_array_equal(s.rewards[:, 0, 0].numpy()[valid], np.array(steps)[valid])

    check(leaf=3, steps=[3, 4, 5, 6], masks=[1, 1, 1, 1])  # crosses the physical end of the arrays
    check(leaf=2, steps=[2, 3, 4, 5], masks=[1, 1, 1, 1])  # the oldest transition
    check(leaf=4, steps=[4, 5, 6, 2], masks=[1, 1, 1, 0])  # position 2 is stale: step 2, not 7
    check(leaf=1, steps=[6, 2, 3, 4], masks=[1, 0, 0, 0])  # the newest transition


def test_sequences_stay_in_their_env_column():
    set_random_seed(1)
    n_envs = 3
    buf = make_buffer(6, n_envs=n_envs)
    for step in range(5):
        add_step(buf, step, terminated=[False, step == 1, False], truncated=[False, False, step == 2])

    s = buf.sample_sequences(300, 3)
    start, env_ids = np.divmod(s.indices, n_envs)
    assert set(env_ids) == {0, 1, 2} and set(start) == {0, 1, 2, 3, 4}
    obs, masks = s.observations.numpy(), s.masks[..., 0].numpy().astype(bool)
    np.testing.assert_array_equal(obs[0], np.stack([env_ids, start], axis=1))
    np.testing.assert_array_equal(obs[1:, :, 0][masks], np.broadcast_to(env_ids, masks.shape)[masks])
    expected_next = start + np.arange(3)[:, None] + 0.5
    np.testing.assert_array_equal(obs[1:, :, 1][masks], expected_next[masks])

    # Env 1 terminates at step 1, env 2 is truncated at step 2, env 0 goes on.
    for env_id, masks_, terminals in (
        (0, [1, 1, 1], [0, 0, 0]),
        (1, [1, 1, 0], [0, 1, 0]),
        (2, [1, 1, 1], [0, 0, 0]),
    ):
        s = sample_from(buf, leaf=0 * n_envs + env_id, horizon=3)
        np.testing.assert_array_equal(s.masks[:, 0, 0].numpy(), masks_)
        np.testing.assert_array_equal(s.terminals[:, 0, 0].numpy(), terminals)
    s = sample_from(buf, leaf=1 * n_envs + 2, horizon=3)
    np.testing.assert_array_equal(s.masks[:, 0, 0].numpy(), [1, 1, 0])  # truncated at step 2
    # Write head (pos = 5): from step 3, transitions 3 and 4 only.
    s = sample_from(buf, leaf=3 * n_envs + 0, horizon=3)
    np.testing.assert_array_equal(s.masks[:, 0, 0].numpy(), [1, 1, 0])


def test_importance_weights():
    set_random_seed(2)
    buf = make_buffer(10, alpha=1.0, beta=0.5, priority_eps=0.0)
    add_step(buf, 0)
    add_step(buf, 1)
    buf.update_priorities(np.array([0, 1]), np.array([1.0, 3.0]))
    s = buf.sample_sequences(64, 1)
    weights = s.weights.numpy()
    assert np.all((weights > 0) & (weights <= 1)) and weights.max() == 1.0
    # P = (1/4, 3/4), N = 2: w = (N P)^-beta = (2^0.5, (2/3)^0.5), normalised by the first.
    np.testing.assert_allclose(weights[s.indices == 0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(weights[s.indices == 1], np.sqrt(1 / 3), rtol=1e-6)
    assert (s.indices == 0).sum() == 16  # stratified: exactly a quarter of the 64 segments


def test_sampling_is_reproducible_with_the_global_seed():
    buf = make_buffer(50)
    for step in range(40):
        add_step(buf, step)
    set_random_seed(3)
    first = buf.sample_sequences(16, 3).indices
    set_random_seed(3)
    np.testing.assert_array_equal(buf.sample_sequences(16, 3).indices, first)


def test_normalization_env_is_applied():
    class FakeVecNormalize:
        @staticmethod
        def normalize_obs(obs):
            return obs * 2.0

        @staticmethod
        def normalize_reward(reward):
            return reward + 100.0

    buf = make_buffer(10)
    for step in range(3):
        add_step(buf, step)
    buf.tree.update(np.arange(10), (np.arange(10) == 0).astype(float))
    s = buf.sample_sequences(2, 2, env=FakeVecNormalize())
    np.testing.assert_array_equal(s.observations[:, 0, 1].numpy(), [0.0, 1.0, 3.0])
    np.testing.assert_array_equal(s.rewards[:, 0, 0].numpy(), [100.0, 101.0])


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="optimize_memory_usage"):
        make_buffer(10, optimize_memory_usage=True, handle_timeout_termination=False)

    buf = make_buffer(5)
    with pytest.raises(ValueError, match="empty"):
        buf.sample_sequences(4, 2)
    for step in range(3):
        add_step(buf, step)
    for horizon in (0, 5, 6):
        with pytest.raises(ValueError, match="horizon"):
            buf.sample_sequences(4, horizon)
    assert buf.sample_sequences(4, 4).masks.shape == (4, 4, 1)


def test_uniform_one_step_sample_still_works():
    buf = make_buffer(10)
    for step in range(4):
        add_step(buf, step)
    samples = buf.sample(32)
    np.testing.assert_array_equal(samples.next_observations[:, 1], samples.observations[:, 1] + 0.5)
    assert samples.observations[:, 1].max() <= 3


def test_pickle_round_trip_keeps_priorities(tmp_path):
    buf = make_buffer(10, n_envs=2)
    for step in range(6):
        add_step(buf, step)
    buf.update_priorities(np.array([0, 3, 5]), np.array([0.5, 7.0, 2.0]))
    path = tmp_path / "buffer.pkl"
    save_to_pkl(path, buf)
    loaded = load_from_pkl(path)

    assert isinstance(loaded, PrioritizedReplayBuffer)
    assert loaded.max_priority == buf.max_priority
    np.testing.assert_array_equal(loaded.tree.nodes, buf.tree.nodes)
    set_random_seed(4)
    expected = buf.sample_sequences(8, 2)
    set_random_seed(4)
    got = loaded.sample_sequences(8, 2)
    np.testing.assert_array_equal(got.indices, expected.indices)
    th.testing.assert_close(got.observations, expected.observations)
    th.testing.assert_close(got.weights, expected.weights)
