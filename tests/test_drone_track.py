"""drone-track physics (quadratic drag, thrust lag, feedforward tracking, mass vs vertical wind)
and its classical controllers; the family contract itself is in test_tasks_contract.py."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.tasks import Split, tracking
from runtime.tasks import drone_track as track
from runtime.tasks import drone_track_control as control


def calm(n: int, wind_x: float = 0.0, wind_z: float = 0.0, mass: float = 1.0) -> np.ndarray:
    """Tasks without gusts."""
    return np.tile([wind_x, wind_z, mass, 0.0, 1.0], (n, 1))


def started(tasks: np.ndarray, reference: str = "figure8") -> track.DroneTrack:
    """An env reset on ``tasks`` and placed exactly on its reference."""
    env = track.DroneTrack(len(tasks), reference=reference)
    env.reset(tasks, np.random.default_rng(0))
    env.pos = env.reference_at(0)[0].copy()
    return env


def test_drag_grows_with_the_square_of_the_airspeed() -> None:
    winds = np.array([2.0, 4.0, 8.0])
    env = started(np.concatenate([calm(1, w) for w in winds]))
    env.vel[:] = 0.0  # the air-relative velocity is the wind
    env.step(np.tile(track.HOVER_THRUST, (3, 1)))
    force_x = env.vel[:, 0] / track.DT * track.MASS_NOMINAL
    np.testing.assert_allclose(force_x, track.DRAG_COEF * winds**2, rtol=1e-9)
    np.testing.assert_allclose(force_x[1:] / force_x[:-1], 4.0, rtol=1e-9)
    # a head-on airspeed of 8 m/s made of wind 4 + flying 4 m/s into it: the same force
    env2 = started(calm(1, 4.0))
    env2.vel[:] = [[-4.0, 0.0]]
    env2.step(np.tile(track.HOVER_THRUST, (1, 1)))
    assert (env2.vel[0, 0] + 4.0) / track.DT == pytest.approx(force_x[2], rel=1e-9)


def test_thrust_lags_the_command() -> None:
    env = started(calm(1))
    target = np.array([[5.0, 15.0]])
    produced = []
    for _ in range(8):
        env.step(target)
        produced.append(env.thrust[0].copy())
    produced = np.array(produced)
    np.testing.assert_allclose(produced[0], track.HOVER_THRUST)  # one period of transport delay
    frac = (produced - track.HOVER_THRUST) / (target[0] - track.HOVER_THRUST)
    expected = 1.0 - (1.0 - track.LAG_ALPHA) ** np.arange(8)
    np.testing.assert_allclose(frac, np.stack([expected, expected], 1), atol=1e-12)
    # one time constant after the delay: 63 %
    k = 1 + round(track.LAG_TAU / track.DT)
    assert frac[k - 1, 0] == pytest.approx(1.0 - np.exp(-1.0), abs=1e-9)


def feedforward_errors(invert_lag: bool) -> np.ndarray:
    """Max true tracking error (m) flying pure feedforward in calm air at nominal mass (the
    thrust that makes the discrete motion hit every reference point, drag of the drone's own
    airspeed included), with or without inverting the delay and lag."""
    env = started(calm(2))
    ref = env._ref
    t = np.arange(track.HORIZON + 3) * track.DT
    p_ref = np.stack([track.figure8(ref, tk)[0] for tk in t])  # (T, N, 2)
    vel = np.concatenate([env.vel[None], np.diff(p_ref, axis=0) / track.DT])  # v_{k}
    want = track.MASS_NOMINAL * (np.diff(vel, axis=0) / track.DT + [0.0, track.GRAVITY])
    want -= np.stack([track.drag_force(-v) for v in vel[:-1]])  # the drone's own airspeed
    env.thrust[:] = env.command[:] = want[0]  # start trimmed for the first step
    errors, thrust = [], env.thrust.copy()
    for k in range(track.HORIZON):
        # the command issued now acts one step later through the lag (see the docstring)
        nxt = thrust + track.LAG_ALPHA * (env.command - thrust)
        u = nxt + (want[k + 1] - nxt) / track.LAG_ALPHA if invert_lag else want[k + 1]
        env.step(u)
        thrust = env.thrust.copy()
        errors.append(env.tracking_error())
    return np.max(errors)


def test_zero_wind_and_perfect_feedforward_track_the_reference() -> None:
    assert feedforward_errors(invert_lag=True) < 1e-9
    assert feedforward_errors(invert_lag=False) > 0.05  # the lag alone costs centimetres


def transitions(env: track.DroneTrack, policy, steps: int) -> tuple[np.ndarray, ...]:
    """True (v, f', v') of ``steps`` transitions under ``policy``."""
    obs = env._observe(env.t)
    policy.begin_task(env.tasks)
    v, f, v2 = [], [], []
    for _ in range(steps):
        vel = env.vel.copy()
        action = policy.act(obs)
        res = env.step(track.THRUST_LOW + (track.THRUST_HIGH - track.THRUST_LOW) * (action + 1) / 2)
        policy.observe(obs, action, res.reward, res.obs)
        obs = res.obs
        v.append(vel)
        f.append(env.thrust.copy())
        v2.append(env.vel.copy())
    return np.array(v), np.array(f), np.array(v2)


def residuals(theta: np.ndarray, v: np.ndarray, f: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """m a + m g z - f - drag(w - v) per transition and axis, for theta = (m, w_x, w_z)."""
    mass, wind = theta[0], theta[1:]
    acc = (v2 - v) / track.DT + [0.0, track.GRAVITY]
    return (mass * acc - f - track.drag_force(wind - v)).ravel()


def jacobian(theta: np.ndarray, *data: np.ndarray) -> np.ndarray:
    eps = 1e-6
    cols = [(residuals(theta + eps * e, *data) - residuals(theta - eps * e, *data)) / (2 * eps)
            for e in np.eye(3)]  # fmt: skip
    return np.stack(cols, axis=1)


def test_mass_and_vertical_wind_are_separated_by_the_figure8_not_by_hover() -> None:
    tasks = np.array([[8.5, 1.5, 0.8, 0.0, 1.0], [-6.0, -1.0, 1.25, 0.0, 1.0]])
    env = started(tasks)
    for i in range(len(tasks)):
        v, f, v2 = (x[:, i] for x in transitions(env, control.PrivilegedController(), 60))
        theta = np.array([1.0, 0.0, 0.0])
        for _ in range(20):  # Gauss-Newton from the nominal guess
            step = np.linalg.lstsq(jacobian(theta, v, f, v2), -residuals(theta, v, f, v2), None)
            theta = theta + step[0]
        np.testing.assert_allclose(theta, tasks[i, [2, 0, 1]], atol=1e-6)
        jac = jacobian(theta, v, f, v2)
        sv = np.linalg.svd(jac / np.linalg.norm(jac, axis=0), compute_uv=False)
        assert sv[-1] / sv[0] > 0.05  # well conditioned (columns scaled to unit norm)
        # In hover every transition is the same: the z equation m g = f_z + drag_z cannot
        # separate mass from vertical wind (rank 2 for 3 unknowns).
        hover = [np.repeat(x[:1] * 0.0, 60, axis=0) for x in (v, f, v2)]
        hover[1][:] = f[0]
        assert np.linalg.matrix_rank(jacobian(theta, *hover), tol=1e-9) == 2


def test_observation_is_the_noisy_state_and_never_the_wind() -> None:
    env = track.DroneTrack(64)
    rng = np.random.default_rng(5)
    obs = env.reset(env.sample_tasks(Split.TRAIN, 64, rng), rng)
    p_ref, v_ref, a_ref = env.reference_at(0)
    exact = np.concatenate([env.pos - p_ref, env.vel - v_ref, v_ref, a_ref, env.thrust,
                            env.command], axis=1)  # fmt: skip
    noise = (obs - exact).std(axis=0)
    np.testing.assert_allclose(noise[[0, 1, 2, 3, 8, 9]], track._NOISE[[0, 1, 2, 3, 8, 9]],
                               rtol=0.35)  # fmt: skip
    np.testing.assert_allclose(obs[:, 4:8], exact[:, 4:8], atol=1e-5)


def test_storm_is_ood_and_neural_fly_speeds_are_in_range() -> None:
    conditions = np.array([[4.2, 0, 1, 0, 1], [8.5, 0, 1, 2.4, 1], [12.1, 0, 1, 0, 1]])
    assert set(track.split_of(conditions)) <= {"train", "test"}
    assert track.split_of(np.array([[14.5, 0.0, 1.0, 2.0, 1.0]])).tolist() == ["ood"]


def errors_of(policy, split: Split, n: int = 32) -> np.ndarray:
    env = track.DroneTrack(n)
    tasks = env.sample_tasks(split, n, np.random.default_rng(1))
    return control.fly_errors_cm(policy, env, tasks, seed=1)[40:]


def test_disturbance_observer_beats_pid_and_pid_beats_no_integral() -> None:
    pid = errors_of(control.PIDController(), Split.TEST).mean()
    dob = errors_of(control.DOBController(), Split.TEST).mean()
    pd = errors_of(control.PIDController(control.Gains(16.0, 8.0)), Split.TEST).mean()
    oracle = errors_of(control.PrivilegedController(), Split.TEST).mean()
    assert oracle < dob < 0.5 * pid < 0.5 * pd, (oracle, dob, pid, pd)


def test_tuned_gains_are_the_best_of_their_grid() -> None:
    best, rows = control.tune("pid", tasks=16)
    assert rows[0].mean_cm <= rows[-1].mean_cm and len(rows) == 60
    assert best == rows[0].gains
    with pytest.raises(ValueError, match="pid"):
        control.tune("lqr")


def test_residual_family_is_the_same_plant_behind_an_onboard_pd() -> None:
    """drone-track-residual: correction c added to the nominal PD. c = expert_force flies the
    privileged controller's exact trajectory on drone-track; c = 0 is the bare PD, which the
    wind pushes far off the figure-8."""
    tasks = tracking.condition_tasks(8, seed=3)[24:32]  # 12.1 m/s
    thrust_env = track.DroneTrack(8, reference="figure8")
    residual_env = track.DroneTrackResidual(8, reference="figure8")
    thrust_env.reset(tasks, np.random.default_rng(5))
    residual_env.reset(tasks, np.random.default_rng(5))
    obs_t, obs_r = thrust_env._last_obs, residual_env._last_obs  # the PD's own (float64) copy
    for k in range(track.HORIZON):
        thrust_env.step(track.expert_action(obs_t, tasks, k))
        command = track.pd_thrust(obs_r, track.PD_GAINS, force=track.expert_force(obs_r, tasks, k))
        residual_env.step(track.expert_force(obs_r, tasks, k))
        np.testing.assert_allclose(residual_env.command, command, atol=1e-9)
        obs_t, obs_r = thrust_env._last_obs, residual_env._last_obs
        np.testing.assert_allclose(residual_env.pos, thrust_env.pos, atol=1e-9)
    bare = track.DroneTrackResidual(8, reference="figure8")
    bare.reset(tasks, np.random.default_rng(5))
    errors = []
    for _ in range(track.HORIZON):
        bare.step(np.zeros((8, 2)))
        errors.append(bare.tracking_error())
    assert np.mean(errors[40:]) > 0.1  # > 10 cm: the PD alone does not hold the figure-8
    assert np.array_equal(bare.spec.act_high, track.RESIDUAL_MAX)
