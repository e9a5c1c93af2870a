import os

# MuJoCo picks its GL backend at import; headless machines need EGL (tests that render skip without it).
os.environ.setdefault("MUJOCO_GL", "egl")

import pytest  # noqa: E402
import torch as th  # noqa: E402

# Tiny networks and a light planner: unit tests check behaviour, not learning speed.
TINY_POLICY = dict(latent_dim=8, mlp_dim=32, enc_dim=16)
TINY = dict(
    policy_kwargs=TINY_POLICY,
    batch_size=16,
    learning_starts=50,
    seed_updates=5,
    num_samples=32,
    num_elites=4,
    planning_iterations=2,
    horizon=3,
    buffer_size=2_000,
)


def gl_context_error() -> str | None:
    """
    Why MuJoCo cannot render off-screen here (``None`` if it can), found without this package's code:
    a skip must mean "no renderer", never a bug of ours.
    """
    try:
        import mujoco
        from gymnasium.envs.mujoco.mujoco_rendering import OffScreenViewer

        model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='1'/></worldbody></mujoco>")
        OffScreenViewer(model, mujoco.MjData(model), 8, 8).close()
    except Exception as error:  # missing or unusable GL backend
        return f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}: {error!r}"
    return None


@pytest.fixture(autouse=True)
def _single_thread():
    # Two cores are shared by the suite; one torch thread avoids oversubscription.
    threads = th.get_num_threads()
    th.set_num_threads(1)
    yield
    th.set_num_threads(threads)
