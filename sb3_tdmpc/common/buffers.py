"""Prioritized replay of fixed-length sub-trajectories, as TD-MPC trains on."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.vec_env import VecNormalize


class SumTree:
    """
    Binary sum tree over ``capacity`` non-negative leaves, vectorised over batches of indices.

    Classic flat layout: node ``n`` has children ``2n`` and ``2n + 1``, the root is node 1 and
    leaf ``i`` is node ``n_leaves + i``, where ``n_leaves`` is ``capacity`` rounded up to a power
    of two (the padding leaves stay at zero).

    :param capacity: Number of leaves
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"SumTree capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.depth = int(np.ceil(np.log2(capacity))) if capacity > 1 else 0
        self.n_leaves = 1 << self.depth
        self.nodes = np.zeros(2 * self.n_leaves, dtype=np.float64)

    @property
    def total(self) -> float:
        """The sum of all leaves (the root)."""
        return float(self.nodes[1])

    def _check_indices(self, leaf_indices: np.ndarray) -> np.ndarray:
        leaf_indices = np.asarray(leaf_indices, dtype=np.int64).reshape(-1)
        if leaf_indices.size and (leaf_indices.min() < 0 or leaf_indices.max() >= self.capacity):
            raise IndexError(f"SumTree leaf indices must lie in [0, {self.capacity})")
        return leaf_indices

    def get(self, leaf_indices: np.ndarray) -> np.ndarray:
        """The values of the leaves ``leaf_indices``."""
        return self.nodes[self.n_leaves + self._check_indices(leaf_indices)]

    def update(self, leaf_indices: np.ndarray, values: np.ndarray) -> None:
        """
        Set leaves, then recompute their ancestors from their children, so that every internal
        node is exactly the floating-point sum of its two children (no drift from adding deltas).

        :param leaf_indices: Leaf indices; with duplicates, the last occurrence wins
        :param values: Non-negative finite values, one per index (or a scalar)
        """
        leaf_indices = self._check_indices(leaf_indices)
        values = np.broadcast_to(np.asarray(values, dtype=np.float64).reshape(-1), leaf_indices.shape)
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError("SumTree values must be finite and non-negative")
        if leaf_indices.size == 0:
            return
        # NumPy does not promise which duplicate wins a fancy assignment: keep the last explicitly.
        rev_unique, rev_first = np.unique(leaf_indices[::-1], return_index=True)
        nodes = rev_unique + self.n_leaves
        self.nodes[nodes] = values[::-1][rev_first]
        children = self.nodes.reshape(-1, 2)  # row n: the children 2n, 2n + 1 of node n
        for _ in range(self.depth):
            # A repeated parent is written twice with the same sum: cheaper than dropping repeats.
            nodes >>= 1
            pair = children.take(nodes, axis=0)
            self.nodes[nodes] = pair[:, 0] + pair[:, 1]

    def find(self, prefix_sums: np.ndarray) -> np.ndarray:
        """
        For each ``u`` in ``[0, total)``, the leaf ``i`` with ``cumsum[i - 1] <= u < cumsum[i]``.

        Never returns a zero-mass (or padding) leaf as long as ``total > 0``, even when round-off
        pushes ``u`` past the mass of the subtree it descends into.

        :param prefix_sums: Values in ``[0, total)``; values outside are clipped into it
        :return: Leaf indices (int64), same shape as ``prefix_sums``
        """
        total = self.nodes[1]
        if total <= 0:
            raise ValueError("Cannot search a SumTree whose total mass is zero")
        u = np.asarray(prefix_sums, dtype=np.float64)
        shape = u.shape
        u = np.clip(u.reshape(-1), 0.0, np.nextafter(total, 0.0))
        children = self.nodes.reshape(-1, 2)  # row n: the children 2n, 2n + 1 of node n
        nodes = np.ones(u.shape, dtype=np.int64)
        for _ in range(self.depth):
            left, right = children.take(nodes, axis=0).T
            # A zero-mass child is never entered, whatever round-off did to u: with u >= 0, a
            # zero-mass left child is always passed, and a zero-mass right one never taken.
            go_right = (u >= left) & (right > 0)
            np.subtract(u, left, out=u, where=go_right)
            nodes <<= 1
            nodes += go_right
        return (nodes - self.n_leaves).reshape(shape)


class SequenceSamples(NamedTuple):
    """
    A batch of ``B`` sub-trajectories of ``H`` transitions (time-major).

    ``observations[0]`` is the start observation and ``observations[t + 1]`` the next observation
    of transition ``t``. ``masks[t]`` is 1 where transition ``t`` belongs to the start's episode
    and has really been stored; where it is 0, transition ``t`` and ``observations[t + 1]`` are
    meaningless (another episode, stale or never written data).
    """

    observations: th.Tensor  # [H + 1, B, *obs_shape] float32 (uint8 for uint8 image observations)
    actions: th.Tensor  # [H, B, action_dim]
    rewards: th.Tensor  # [H, B, 1]
    terminals: th.Tensor  # [H, B, 1] float32, 1 on true termination (not on timeout)
    masks: th.Tensor  # [H, B, 1] float32
    weights: th.Tensor  # [B] float32, importance weights, max 1
    indices: np.ndarray  # [B] int64 tree leaf indices, for ``update_priorities``


def last_written_row(buffer: ReplayBuffer) -> int | None:
    """The row (step, over all envs) that ``buffer.add`` wrote last; ``None`` while the buffer is empty."""
    return None if buffer.size() == 0 else (buffer.pos - 1) % buffer.buffer_size


def close_episodes(buffer: ReplayBuffer, envs: np.ndarray | list[int] | slice = slice(None)) -> None:
    """
    Mark the last transition stored for each of ``envs`` as a time-out where it does not already end
    an episode, so that no sequence runs on from it into what that env stores next. Without
    ``handle_timeout_termination`` (every episode end a terminal, as SB3 stores it then) only as done:
    SB3's ``add`` would never clear a time-out flag of that row.
    """
    row = last_written_row(buffer)
    if row is None:
        return
    chosen = np.zeros(buffer.n_envs, dtype=bool)
    chosen[envs] = True
    unfinished = chosen & (buffer.dones[row] == 0)
    if buffer.handle_timeout_termination:
        buffer.timeouts[row, unfinished] = 1
    buffer.dones[row, unfinished] = 1


class PrioritizedReplayBuffer(ReplayBuffer):
    """
    Replay buffer with proportional prioritized sampling (Schaul et al. 2016) of sub-trajectories
    of consecutive transitions, as used by TD-MPC. One-step uniform ``sample()`` is SB3's.

    Transition ``(pos, env)`` is leaf ``pos * n_envs + env`` of a sum tree holding
    ``priority ** alpha``; new transitions get the largest priority seen so far.

    :param buffer_size: Max number of transitions in the buffer (over all envs)
    :param observation_space: Observation space
    :param action_space: Action space
    :param device: PyTorch device the samples are put on
    :param n_envs: Number of parallel environments
    :param optimize_memory_usage: Must be False: memory-optimised storage keeps no separate next
        observation, so the final observation of an episode, which sequences need, would be lost
    :param handle_timeout_termination: Store timeouts separately, so that a truncation is not
        reported as a terminal (it still ends the sequence)
    :param alpha: Prioritization exponent (0 is uniform sampling)
    :param beta: Importance-sampling exponent (1 fully corrects the prioritization bias)
    :param priority_eps: Added to every priority so that no stored transition becomes unreachable
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        alpha: float = 0.6,
        beta: float = 0.4,
        priority_eps: float = 1e-6,
    ):
        if optimize_memory_usage:
            raise ValueError(
                "PrioritizedReplayBuffer does not support optimize_memory_usage=True: that storage "
                "drops the final observation of each episode, which sequence sampling needs."
            )
        super().__init__(
            buffer_size,
            observation_space,
            action_space,
            device=device,
            n_envs=n_envs,
            optimize_memory_usage=False,
            handle_timeout_termination=handle_timeout_termination,
        )
        if self.observations.dtype.kind == "f" and self.observations.dtype != np.float32:
            # Kept as the networks read them (gymnasium's MuJoCo observes float64: half the memory).
            self.observations = np.zeros(self.observations.shape, dtype=np.float32)
            self.next_observations = np.zeros(self.next_observations.shape, dtype=np.float32)
        self.alpha = alpha
        self.beta = beta
        self.priority_eps = priority_eps
        self.tree = SumTree(self.buffer_size * self.n_envs)
        self.max_priority = 1.0
        self.rows_added = 0  # add() calls since the buffer was empty: tells two saves of one run apart

    def reset(self) -> None:
        """Empty the buffer, its priorities included."""
        super().reset()
        self.tree = SumTree(self.buffer_size * self.n_envs)
        self.max_priority = 1.0
        self.rows_added = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickling (load_replay_buffer) checks the data before anything trains on it.
        self.__dict__.update({"rows_added": None, **state})  # None: pickled before it was counted
        self.check_consistency()

    def check_consistency(self) -> None:
        """
        Raise ``ValueError`` unless the storage, the write position and the sum tree agree and every
        stored value is finite: what a corrupted or hand-edited buffer file would break.
        """
        rows, n_envs = self.buffer_size, self.n_envs
        problems = []
        for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
            array = getattr(self, name, None)
            if not isinstance(array, np.ndarray) or array.shape[:2] != (rows, n_envs):
                shape = getattr(array, "shape", None)
                problems.append(f"{name} has shape {shape}, expected ({rows}, {n_envs}, ...)")
        if not 0 <= self.pos < rows:
            problems.append(f"write position {self.pos} outside [0, {rows})")
        tree = getattr(self, "tree", None)
        if (
            not isinstance(tree, SumTree)
            or tree.capacity != rows * n_envs
            or tree.nodes.shape != (2 * tree.n_leaves,)
        ):
            problems.append("the priority sum tree does not match the buffer's size")
        if problems:
            raise ValueError("Inconsistent replay buffer: " + "; ".join(problems))

        stored = self.size()
        leaves = tree.nodes[tree.n_leaves :]
        if not (np.all(np.isfinite(tree.nodes)) and np.all(tree.nodes >= 0)):
            problems.append("non-finite or negative priorities")
        elif np.any(leaves[stored * n_envs :]):
            problems.append("priorities on transitions never written")
        elif not np.isclose(tree.total, leaves.sum(), rtol=1e-6, atol=0.0):
            problems.append(f"the sum tree's total {tree.total} is not the sum of its leaves {leaves.sum()}")
        elif stored and tree.total <= 0:
            problems.append("every stored transition has zero priority")
        if not (np.isfinite(self.max_priority) and self.max_priority > 0):
            problems.append(f"max_priority is {self.max_priority}")
        for name in ("observations", "next_observations", "actions", "rewards"):
            if not np.all(np.isfinite(getattr(self, name)[:stored])):
                problems.append(f"non-finite stored {name}")
        if problems:
            raise ValueError("Inconsistent replay buffer: " + "; ".join(problems))

    def add(
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        """SB3's ``add``; the new transitions get the largest priority seen so far, so each is drawn soon."""
        pos = self.pos  # super().add advances it
        super().add(obs, next_obs, action, reward, done, infos)
        self.rows_added += 1
        leaves = pos * self.n_envs + np.arange(self.n_envs)
        self.tree.update(leaves, np.full(self.n_envs, self.max_priority**self.alpha))

    def sample_sequences(
        self, batch_size: int, horizon: int, env: VecNormalize | None = None
    ) -> SequenceSamples:
        """
        Sample ``batch_size`` sub-trajectories of ``horizon`` transitions, with start transitions
        drawn proportionally to ``priority ** alpha`` (stratified over the tree's mass).

        :param batch_size: Number of sequences
        :param horizon: Number of transitions per sequence
        :param env: associated VecEnv, to normalize the observations/rewards when sampling
        :return: The sequences, see ``SequenceSamples``
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 1 <= horizon < self.buffer_size:
            raise ValueError(
                f"horizon must be in [1, {self.buffer_size}) (the buffer's length per env), got "
                f"{horizon}: a horizon larger than the buffer can serve"
            )
        n_stored = self.size() * self.n_envs
        if n_stored == 0:
            raise ValueError("Cannot sample from an empty replay buffer")
        total = self.tree.total
        if total <= 0:
            raise ValueError(
                "No stored transition can start a sequence: every priority is 0 (e.g. every transition so "
                "far was non-finite and dropped, see num_nonfinite_transitions)"
            )
        # The global legacy RNG, so that SB3's set_random_seed makes sampling reproducible.
        jitter = np.random.uniform(size=batch_size)  # noqa: NPY002
        u = (np.arange(batch_size) + jitter) * (total / batch_size)
        leaves = self.tree.find(u)
        start, env_ids = np.divmod(leaves, self.n_envs)

        steps = np.arange(horizon)[:, None]
        # [H, B] leaf indices of the sequences' transitions, always in the start's env column
        flat = (start + steps) % self.buffer_size * self.n_envs + env_ids

        # Transitions t >= n_written(start) are stale (full) or never written (not full).
        n_written = (self.pos - start - 1) % self.buffer_size + 1 if self.full else self.pos - start
        dones = self._gather(self.dones, flat)
        timeouts = self._gather(self.timeouts, flat)
        # A done step is itself valid (its next observation is the true last one); later steps are not.
        done_before = np.cumsum(dones, axis=0) - dones > 0
        masks = (steps < n_written) & ~done_before

        observations = np.concatenate(
            [self._gather(self.observations, leaves[None]), self._gather(self.next_observations, flat)],
            axis=0,
        )
        observations = self._normalize_obs(observations, env)
        # Images stay uint8 (4x less to move; the encoder converts them); anything else, a uint8 vector
        # too, is float32, as SB3's preprocessing gives it to predict.
        if observations.dtype != np.uint8 or not is_image_space(self.observation_space):
            observations = observations.astype(np.float32, copy=False)
        rewards = self._normalize_reward(self._gather(self.rewards, flat)[..., None], env)

        probs = self.tree.get(leaves) / total
        weights = (n_stored * probs) ** (-self.beta)
        weights /= weights.max()

        return SequenceSamples(
            observations=self.to_torch(observations, copy=False),
            actions=self.to_torch(self._gather(self.actions, flat), copy=False),
            rewards=self.to_torch(rewards, copy=False),
            terminals=self.to_torch((dones * (1.0 - timeouts))[..., None].astype(np.float32), copy=False),
            masks=self.to_torch(masks[..., None].astype(np.float32), copy=False),
            weights=self.to_torch(weights.astype(np.float32), copy=False),
            indices=leaves.astype(np.int64, copy=False),
        )

    @staticmethod
    def _gather(array: np.ndarray, flat_indices: np.ndarray) -> np.ndarray:
        # np.take on the [buffer_size * n_envs, ...] view is several times faster than a[pos, env].
        return np.take(array.reshape(-1, *array.shape[2:]), flat_indices, axis=0)

    def never_start_at_last(self, envs: np.ndarray) -> None:
        """Zero the priority of the last transition stored for each of ``envs``: no sequence starts there."""
        row = last_written_row(self)
        if row is not None:
            self.tree.update(row * self.n_envs + np.asarray(envs), 0.0)

    def update_priorities(self, indices: np.ndarray, priorities: np.ndarray | th.Tensor) -> None:
        """
        Set the priorities of sampled start transitions (typically their TD-MPC loss).

        :param indices: Leaf indices, as returned in ``SequenceSamples.indices``
        :param priorities: One non-negative finite priority per index (any shape, any device)
        """
        if isinstance(priorities, th.Tensor):
            priorities = priorities.detach().cpu().numpy()
        raw = np.asarray(priorities, dtype=np.float64).reshape(-1) + self.priority_eps
        indices = np.asarray(indices).reshape(-1)
        if raw.shape != indices.shape:
            raise ValueError(f"Got {indices.size} indices but {raw.size} priorities")
        if not np.all(np.isfinite(raw)):
            raise ValueError("Priorities must be finite (got NaN or inf; is the loss diverging?)")
        if np.any(raw < 0):
            raise ValueError("Priorities must be non-negative")
        if raw.size == 0:
            return
        self.max_priority = max(self.max_priority, float(raw.max()))
        self.tree.update(indices, raw**self.alpha)
