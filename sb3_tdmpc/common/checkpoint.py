"""Helpers for checkpoints that resume exactly: atomic writes, readable load errors, RNG states.

Everything here is independent of the algorithm; :class:`sb3_tdmpc.TDMPC` uses it in ``save``,
``load``, ``save_replay_buffer``, ``load_replay_buffer`` and when ``learn`` resumes a run.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import pickle
import random
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.vec_env import VecEnv


class CheckpointError(ValueError):
    """A checkpoint or replay-buffer file cannot be used: truncated, corrupted or from another run."""


class NonFiniteLossError(FloatingPointError, ValueError):
    """A loss or gradient of an update is NaN or infinite; the update was not applied.

    Also a ``ValueError``, so that rl-zoo3's ``-optimize`` prunes a diverging trial instead of stopping.
    """


class ResumeWarning(UserWarning):
    """``learn(reset_num_timesteps=False)`` after ``load`` cannot continue the saved run exactly."""


class NonFiniteTransitionWarning(RuntimeWarning):
    """An environment returned a NaN or infinite reward or observation; the transition was not stored."""


# --------------------------------------------------------------------------- paths and files


def save_path(path: str | pathlib.Path, suffix: str) -> pathlib.Path:
    """Where Stable-Baselines3 writes ``path``: ``.<suffix>`` appended when the name has no suffix."""
    path = pathlib.Path(path)
    return path if path.suffix else pathlib.Path(f"{path}.{suffix}")


def load_path(path: str | pathlib.Path, suffix: str) -> pathlib.Path:
    """
    Where Stable-Baselines3 reads ``path``: as given if it is a file, else with ``.<suffix>`` appended
    (``save("run/reach-v3")`` wrote ``run/reach-v3.zip``, beside the zoo's ``run/reach-v3/`` folder).
    """
    path = pathlib.Path(path)
    if path.is_file() or not suffix:
        return path
    with_suffix = pathlib.Path(f"{path}.{suffix}")
    return with_suffix if with_suffix.is_file() else path


def _file_mode(path: pathlib.Path) -> int:
    """Permissions for a new file at ``path``: those of the file it replaces, else the umask's default."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | pathlib.Path, write: Callable[[io.BufferedIOBase], None]) -> pathlib.Path:
    """
    Write a file so that a crash never leaves a partial file under ``path``.

    ``write`` fills a temporary file in the same directory, which is flushed to disk and then
    renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows). If anything fails
    before the rename, the temporary file is removed and an existing ``path`` is untouched.

    :param path: Final location (its parent directory is created if needed)
    :param write: Writes the content into the binary file object it is given
    :return: ``path``
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _file_mode(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    # Make the rename itself durable (POSIX; directories cannot be opened on Windows).
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def check_zip_archive(
    source: pathlib.Path | io.BufferedIOBase, required: tuple[str, ...] = ("data", "policy.pth")
) -> None:
    """
    Raise :class:`CheckpointError` naming ``source`` unless it is a complete, uncorrupted model archive.

    Checks the zip structure (a truncated file has no central directory), every member's CRC and
    that the members a model needs are present (in a file or a file object).
    """
    if isinstance(source, pathlib.Path) and not source.is_file():
        raise FileNotFoundError(f"No checkpoint at {source}")
    name = _name(source)
    try:
        with zipfile.ZipFile(source) as archive:
            bad = archive.testzip()
            names = set(archive.namelist())
            # Where the archive found starts inside the file (a truncated checkpoint can end in the
            # torch.save archive of one of its members, which zipfile then opens on its own).
            starts_at = min((info.header_offset for info in archive.infolist()), default=0)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{name} is not a readable model checkpoint (truncated or corrupted zip file: {e}). "
            "Saves are atomic, so an older checkpoint of the run, if any, is intact."
        ) from e
    if bad is not None:
        raise CheckpointError(f"{name} is corrupted: member {bad!r} fails its CRC check")
    missing = [member for member in required if member not in names]
    if (
        missing
        and starts_at == 0
        and "data" in missing
        and any(member.endswith("/data.pkl") for member in names)
    ):
        raise CheckpointError(
            f"{name} is a torch.save file, not a model checkpoint: a policy saved alone "
            "(policy.save) loads with its class's load, e.g. MlpPolicy.load"
        )
    if missing:
        raise CheckpointError(
            f"{name} is not a complete model checkpoint (truncated or corrupted): "
            f"it lacks {', '.join(missing)}"
        )


def _name(source: pathlib.Path | io.BufferedIOBase) -> str:
    return (
        str(source)
        if isinstance(source, pathlib.Path)
        else str(getattr(source, "name", "the checkpoint file"))
    )


def load_pickle(path: str | pathlib.Path) -> Any:
    """
    Unpickle ``path`` (as ``load_from_pkl``, ``.pkl`` appended if needed), turning any failure of a
    truncated or corrupted file into a :class:`CheckpointError` naming it.

    Like every pickle, only load files you trust: unpickling can run arbitrary code.
    """
    resolved = load_path(path, "pkl")
    if not resolved.is_file():
        raise FileNotFoundError(f"No replay buffer file at {path}")
    try:
        with open(resolved, "rb") as file:
            return pickle.load(file)
    except CheckpointError:
        raise
    except Exception as e:  # any unpickling failure means a bad file
        raise CheckpointError(
            f"{resolved} is not a readable replay buffer (truncated or corrupted: {type(e).__name__}: {e})"
        ) from e


# --------------------------------------------------------------------------- random number generators


def global_rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's global (legacy) RNG and torch's CPU (and CUDA) RNGs."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": th.get_rng_state(),
    }
    if th.cuda.is_available() and th.cuda.is_initialized():
        state["torch_cuda"] = th.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`global_rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    th.set_rng_state(state["torch"])
    cuda = state.get("torch_cuda")
    if cuda is not None and th.cuda.is_available() and len(cuda) == th.cuda.device_count():
        th.cuda.set_rng_state_all(cuda)


def generator_from_state(state: dict[str, Any]) -> np.random.Generator:
    """A new ``numpy.random.Generator`` whose bit generator is in ``state`` (``bit_generator.state``)."""
    generator = np.random.Generator(getattr(np.random, state["bit_generator"])())
    generator.bit_generator.state = state
    return generator


def env_rng_states(venv: VecEnv) -> list[dict[str, Any] | None] | None:
    """
    ``np_random.bit_generator.state`` of each sub-environment (gymnasium envs and their wrappers,
    Meta-World's task sampling included, all draw from it); None where that is not available.
    """
    try:
        generators = venv.get_attr("np_random")
    except Exception:  # an env without np_random (or a remote failure): no exact resume possible
        return None
    return [g.bit_generator.state if isinstance(g, np.random.Generator) else None for g in generators]


def set_env_rng_states(venv: VecEnv, states: list[dict[str, Any]]) -> None:
    """Give each sub-environment a generator in the saved state."""
    for index, state in enumerate(states):
        venv.set_attr("np_random", generator_from_state(state), indices=[index])
