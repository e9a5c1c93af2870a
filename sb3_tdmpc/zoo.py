"""
rl-zoo3 launcher for TD-MPC: ``tdmpc-zoo VERB [zoo arguments]`` or ``python -m sb3_tdmpc.zoo VERB ...``.

rl-zoo3 has no plugin mechanism; following its own guide for third-party algorithms (SBX), this
launcher registers TD-MPC with the zoo, then runs the zoo's own command for ``VERB`` with the rest
of the command line untouched:

* ``rl_zoo3.ALGOS["tdmpc"]``: TDMPC, as :class:`ContinuingTDMPC` or :class:`InferenceTDMPC` (the
  dict that ``--algo`` choices are read from),
* :func:`sample_tdmpc_params` as the zoo's Optuna sampler for ``-optimize`` (and its converter for
  ``--trial-id``),
* the Meta-World ids (``reach-v3``, ...) are registered by ``import sb3_tdmpc``.

Verbs are the zoo's: ``train``, ``enjoy``, ``plot_train``, ``plot_from_file`` and ``all_plots``
(``python -m rl_zoo3.cli``), plus its script modules ``record_video``, ``record_training``,
``push_to_hub`` and ``load_from_hub`` (``python -m rl_zoo3.<verb>``). The launcher adds two defaults
to the command line:

* ``--algo`` defaults to ``tdmpc`` (the zoo's default is ``ppo``) for the verbs that take one algorithm;
* ``train --algo tdmpc`` without ``-conf`` reads the hyperparameters shipped in this package
  (:func:`default_config_path`), where the zoo would look inside its own package; ``-conf NAME``
  that is no file here but names one shipped in ``sb3_tdmpc/hyperparams`` (``tdmpc_cpu.yml``, the
  CPU preset) reads that one (:func:`shipped_config`).

``train -i <run>/<env>.zip`` continues the run where it stopped when the replay buffer saved with
it (``--save-replay-buffer``) is there: the step count, seed phase and schedules go on instead of
restarting (:class:`ContinuingTDMPC`).

Loading for inference (``enjoy``, ``record_video``, ``record_training``, ``push_to_hub``) allocates
a one-transition replay buffer instead of the trained one (``buffer_size`` 1e6 is hundreds
of MB), as the zoo does for its own off-policy algorithms.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import runpy
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sb3_tdmpc import TDMPC
from sb3_tdmpc.common.checkpoint import ResumeWarning

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DEFAULT_ALGO",
    "VERBS",
    "ContinuingTDMPC",
    "InferenceTDMPC",
    "convert_tdmpc_params",
    "default_config_path",
    "main",
    "prepare_args",
    "register",
    "sample_tdmpc_params",
]

DEFAULT_ALGO = "tdmpc"
"""``--algo`` when the command line names none."""

# verb -> (module, function); function None: the module is a script, run as ``__main__``.
VERBS: dict[str, tuple[str, str | None]] = {
    "train": ("rl_zoo3.train", "train"),
    "enjoy": ("rl_zoo3.enjoy", "enjoy"),
    "plot_train": ("rl_zoo3.plots.plot_train", "plot_train"),
    "plot_from_file": ("rl_zoo3.plots.plot_from_file", "plot_from_file"),
    "all_plots": ("rl_zoo3.plots.all_plots", "all_plots"),
    "record_video": ("rl_zoo3.record_video", None),
    "record_training": ("rl_zoo3.record_training", None),
    "push_to_hub": ("rl_zoo3.push_to_hub", None),
    "load_from_hub": ("rl_zoo3.load_from_hub", None),
}
"""The zoo's commands, by the name they are given on ``tdmpc-zoo``'s command line."""

# Verbs whose ``--algo`` picks one entry of rl_zoo3.ALGOS (the plot verbs use ``-a/--algo(s)`` otherwise).
_ALGO_VERBS = frozenset({"train", "enjoy", "record_video", "record_training", "push_to_hub", "load_from_hub"})
# Verbs that load a trained model only to run it.
_INFERENCE_VERBS = frozenset({"enjoy", "record_video", "record_training", "push_to_hub"})


def default_config_path(algo: str = DEFAULT_ALGO) -> Path:
    """
    The hyperparameter file shipped in this package for ``algo``: ``sb3_tdmpc/hyperparams/<algo>.yml``.

    It is package data, so it is found the same way from a checkout, an editable install or a wheel.

    :param algo: Algorithm name as given to ``--algo``
    :return: Path of the YAML file
    :raises FileNotFoundError: If the package ships no file for ``algo``
    """
    path = shipped_config(algo)
    if path is None:
        raise FileNotFoundError(f"sb3_tdmpc ships no hyperparameters for {algo!r} (sb3_tdmpc/hyperparams/)")
    return path


# --------------------------------------------------------------------------- Optuna sampler


def sample_tdmpc_params(
    trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict[str, Any]
) -> dict[str, Any]:
    """
    Sample TD-MPC hyperparameters for ``tdmpc-zoo train -optimize`` (rl-zoo3's sampler signature).

    Samples what drives learning: optimisation (learning rate, discount, target EMA), the TOLD
    losses (horizon, rho, loss weights) and the planner's temperature and noise. What sets the
    cost of a trial (network sizes, ``batch_size``, ``num_samples``, ``planning_iterations``,
    ``buffer_size``) is left to the YAML and ``-params``, so that the trials of a study cost the
    same and fit the machine they run on. Parameter names are TDMPC arguments, so a trial's
    ``params`` are directly the hyperparameters (see :func:`convert_tdmpc_params`).

    :param trial: Optuna trial
    :param n_actions: Action dimension (unused)
    :param n_envs: Number of environments (unused)
    :param additional_args: The zoo's extra arguments (unused: TD-MPC has no HER variant)
    :return: Keyword arguments for TDMPC
    """
    params = {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True),
        "gamma": trial.suggest_categorical("gamma", [0.95, 0.98, 0.99, 0.995]),
        "tau": trial.suggest_float("tau", 0.002, 0.05, log=True),
        "horizon": trial.suggest_int("horizon", 3, 7),
        "rho": trial.suggest_float("rho", 0.3, 0.9),
        "consistency_coef": trial.suggest_float("consistency_coef", 0.5, 10.0, log=True),
        "reward_coef": trial.suggest_float("reward_coef", 0.1, 2.0, log=True),
        "value_coef": trial.suggest_float("value_coef", 0.02, 1.0, log=True),
        "temperature": trial.suggest_float("temperature", 0.1, 2.0, log=True),
        "min_std": trial.suggest_categorical("min_std", [0.02, 0.05, 0.1]),
        "exploration_final_std": trial.suggest_categorical("exploration_final_std", [0.02, 0.05, 0.1]),
    }
    return convert_tdmpc_params(params)


def convert_tdmpc_params(sampled_params: dict[str, Any]) -> dict[str, Any]:
    """
    Turn a trial's ``params`` into TDMPC keyword arguments (rl-zoo3's converter, used by ``--trial-id``).

    The sampler's parameter names already are TDMPC arguments, so this is a copy.
    """
    return dict(sampled_params)


# --------------------------------------------------------------------------- inference loading


class InferenceTDMPC(TDMPC):
    """
    TDMPC as loaded by the zoo's inference verbs (``enjoy``, ``record_video``, ...): with a
    one-transition replay buffer, whatever ``buffer_size`` it was trained with.

    The zoo passes ``buffer_size=1`` to its own off-policy algorithms for the same purpose, from a
    list local to each script, which cannot be extended; this class stands for TDMPC in
    ``rl_zoo3.ALGOS`` while such a verb runs. The loaded model is a TDMPC in every other respect.
    """

    @classmethod
    def load(cls, path: Any, *args: Any, **kwargs: Any) -> TDMPC:  # type: ignore[override]
        kwargs.setdefault("buffer_size", 1)
        return super().load(path, *args, **kwargs)


class ContinuingTDMPC(TDMPC):
    """
    TDMPC as ``tdmpc-zoo train`` creates and loads it. The zoo's ``-i <run>/<env>.zip`` loads the
    model, then ``replay_buffer.pkl`` beside it when the run saved one (``--save-replay-buffer``),
    then calls ``learn(n_timesteps)``, which would restart the step count at 0 and with it TD-MPC's
    seed phase, planning-horizon warm-up and exploration decay. A model that has taken steps and
    whose replay buffer holds transitions (the one loaded beside it) continues the run instead
    (``reset_num_timesteps=False``: ``-n N`` trains N more steps), bitwise as the uninterrupted run
    when it was saved at an episode end (docs/reliability.md). Without a buffer (a checkpoint
    ``rl_model_<N>_steps.zip``) there is nothing to continue from and the zoo's restart applies;
    so it does, with the buffer emptied, when the buffer beside a checkpoint is another point's of
    the run (the zoo loads the folder's ``replay_buffer.pkl``, saved at the run's end). In every
    other respect this is TDMPC.
    """

    def learn(  # type: ignore[override]
        self,
        total_timesteps: int,
        callback: Any = None,
        log_interval: int = 4,
        tb_log_name: str = "TDMPC",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> ContinuingTDMPC:
        # A model that has taken steps and holds transitions: loaded together with its buffer.
        buffer = self.replay_buffer
        holds = buffer is not None and buffer.size() > 0
        saved = getattr(self, "_resume_state", None)  # None: an older model, which did not record it
        if (
            self.num_timesteps > 0
            and holds
            and saved is not None
            and not self._holds_buffer_saved_at(saved["buffer_position"])
        ):
            warnings.warn(
                f"The replay buffer loaded with the model saved at step {self.num_timesteps} is not "
                f"the one saved with it (write position and rows added {self._buffer_position()}, saved "
                f"{saved['buffer_position']}): as for a checkpoint without a buffer, training restarts "
                "its step count with an empty replay buffer",
                ResumeWarning,
                stacklevel=2,
            )
            buffer.reset()
            holds = False
        continues = self.num_timesteps > 0 and holds
        return super().learn(
            total_timesteps,
            callback,
            log_interval,
            tb_log_name,
            reset_num_timesteps=reset_num_timesteps and not continues,
            progress_bar=progress_bar,
        )


# --------------------------------------------------------------------------- launcher


def register(inference: bool = False) -> None:
    """
    Make TD-MPC a zoo algorithm: ``rl_zoo3.ALGOS["tdmpc"]`` and its Optuna sampler and converter.

    The zoo's modules bind these dicts by ``from ... import``, so they are updated in place.

    :param inference: Register :class:`InferenceTDMPC` (light loading) instead of
        :class:`ContinuingTDMPC` (training)
    """
    import rl_zoo3  # noqa: F401  (applies the zoo's gymnasium patches, as its own commands do)
    from rl_zoo3 import hyperparams_opt
    from rl_zoo3.utils import ALGOS

    ALGOS[DEFAULT_ALGO] = InferenceTDMPC if inference else ContinuingTDMPC
    hyperparams_opt.HYPERPARAMS_SAMPLER[DEFAULT_ALGO] = sample_tdmpc_params
    hyperparams_opt.HYPERPARAMS_CONVERTER[DEFAULT_ALGO] = convert_tdmpc_params


def shipped_config(name: str) -> Path | None:
    """
    ``sb3_tdmpc/hyperparams/<name>`` (``.yml`` appended if missing), the files shipped with the package
    (``tdmpc.yml``, the paper's settings; ``tdmpc_cpu.yml``, the CPU preset); ``None`` if there is none.
    """
    file_name = name if name.endswith((".yml", ".yaml")) else f"{name}.yml"
    if Path(file_name).name != file_name:
        return None  # a path, not a shipped file's name
    path = Path(str(resources.files("sb3_tdmpc").joinpath("hyperparams", file_name)))
    return path if path.is_file() else None


def _launcher_parser() -> argparse.ArgumentParser:
    # The zoo's own spellings, so that abbreviations and `--opt=value` resolve as in its parsers.
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--algo", default=None)
    parser.add_argument("-conf", "--conf-file", default=None)
    return parser


def prepare_args(verb: str, args: Sequence[str]) -> list[str]:
    """
    The zoo command line for ``verb``: ``args`` with the launcher's defaults put in front.

    ``--algo tdmpc`` when no ``--algo`` is given (verbs taking one algorithm), and for ``train``
    with TD-MPC and no ``-conf``, ``--conf-file`` :func:`default_config_path`.

    :param verb: One of :data:`VERBS`
    :param args: The arguments after the verb
    :return: The arguments to run the zoo's command with
    """
    args = list(args)
    if verb not in _ALGO_VERBS:
        return args
    given, _ = _launcher_parser().parse_known_args(args)
    defaults: list[str] = []
    if given.algo is None:
        defaults += ["--algo", DEFAULT_ALGO]
    if verb == "train" and (given.algo or DEFAULT_ALGO) == DEFAULT_ALGO and given.conf_file is None:
        defaults += ["--conf-file", str(default_config_path())]
    shipped = (
        None if given.conf_file is None or Path(given.conf_file).exists() else shipped_config(given.conf_file)
    )
    if shipped is not None:  # `-conf tdmpc_cpu.yml` from anywhere: the file shipped in this package
        args = [_with_value(arg, given.conf_file, str(shipped)) for arg in args]
    return defaults + args


def _with_value(arg: str, value: str, new: str) -> str:
    """``arg`` with the option value ``value`` replaced (``value`` itself, or ``--option=value``)."""
    if arg == value:
        return new
    option, equals, rest = arg.partition("=")
    return f"{option}={new}" if equals and rest == value and option.startswith("-") else arg


@contextlib.contextmanager
def _zoo_record_video_through_launcher() -> Iterator[None]:
    """``record_training`` runs ``python -m rl_zoo3.record_video`` once per model: run ours instead."""
    original_call = subprocess.call

    def call(cmd: Any, *args: Any, **kwargs: Any) -> int:
        if isinstance(cmd, (list, tuple)) and list(cmd[1:3]) == ["-m", "rl_zoo3.record_video"]:
            cmd = [sys.executable, "-m", "sb3_tdmpc.zoo", "record_video", *cmd[3:]]
        return original_call(cmd, *args, **kwargs)

    subprocess.call = call  # type: ignore[assignment]
    try:
        yield
    finally:
        subprocess.call = original_call  # type: ignore[assignment]


def _usage() -> str:
    return (
        "usage: tdmpc-zoo VERB [rl-zoo3 arguments]   (or: python -m sb3_tdmpc.zoo VERB ...)\n"
        f"verbs: {', '.join(VERBS)}\n"
        "Each verb takes the arguments of the rl-zoo3 command of the same name "
        "(`tdmpc-zoo VERB --help`); --algo defaults to tdmpc."
    )


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run the zoo's command ``argv[0]`` with TD-MPC registered.

    :param argv: ``[verb, *zoo_arguments]``; ``sys.argv[1:]`` by default
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    verb, args = argv[0], argv[1:]
    if verb not in VERBS:
        raise SystemExit(f"tdmpc-zoo: unknown verb {verb!r}\n{_usage()}")
    try:
        import rl_zoo3  # noqa: F401
    except ImportError as e:
        raise SystemExit(f'tdmpc-zoo needs rl-zoo3: pip install "sb3-tdmpc[zoo]" ({e})') from e

    args = prepare_args(verb, args)
    register(inference=verb in _INFERENCE_VERBS)
    module_name, function_name = VERBS[verb]

    saved_argv = sys.argv
    sys.argv = [f"tdmpc-zoo {verb}", *args]
    try:
        if function_name is not None:
            command: Callable[[], Any] = getattr(importlib.import_module(module_name), function_name)
            command()
        elif verb == "record_training":
            with _zoo_record_video_through_launcher():
                runpy.run_module(module_name, run_name="__main__")
        else:
            runpy.run_module(module_name, run_name="__main__")
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":
    main()
