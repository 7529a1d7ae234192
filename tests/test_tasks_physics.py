"""Family-specific invariants: the task is identifiable from transitions, adaptation pays,
the physics obeys its documented limits, and the held-out-cell splits partition the box."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.tasks import Split, make_family
from runtime.tasks import car_friction as car
from runtime.tasks import drone_wind as drone
from runtime.tasks.splits import HeldOutCells


def run_controller(name: str, split: Split, task_for_controller, n: int = 64) -> float:
    """Mean return of the family's expert controller fed ``task_for_controller(tasks)``."""
    module = {"drone-wind": drone, "car-friction": car}[name]
    env = make_family(name, n)
    rng = np.random.default_rng(0)
    tasks = env.sample_tasks(split, n, rng)
    obs, total = env.reset(tasks, rng), np.zeros(n)
    for _ in range(env.spec.horizon):
        res = env.step(module.expert_action(obs, task_for_controller(tasks)))
        obs, total = res.obs, total + res.reward
    return float(total.mean())


@pytest.mark.parametrize("name", ["drone-wind", "car-friction"])
def test_knowing_the_task_pays(name: str) -> None:
    nominal = {"drone-wind": drone.nominal_task, "car-friction": car.nominal_task}[name]
    informed = run_controller(name, Split.TEST, lambda tasks: tasks)
    guessing = run_controller(name, Split.TEST, lambda tasks: nominal(len(tasks)))
    assert informed > guessing + 0.3 * abs(informed), (informed, guessing)


def test_drone_wind_and_mass_are_recoverable_from_two_transitions() -> None:
    env = make_family("drone-wind", 16)
    rng = np.random.default_rng(1)
    tasks = env.sample_tasks(Split.TRAIN, 16, rng)
    obs = env.reset(tasks, rng)
    rows, rhs = [], []
    for thrust in ([2.0, 12.0], [-3.0, 7.0]):
        res = env.step(np.tile(thrust, (16, 1)))
        accel = (res.obs[:, 2:4] - obs[:, 2:4]) / drone.DT + np.array([0.0, drone.GRAVITY])
        # m * accel = u + DRAG * (wind - v)  ->  [accel_i, -DRAG] @ [m, wind_i] = u_i - DRAG v_i
        for axis in (0, 1):
            coef = np.zeros((16, 3))
            coef[:, 0], coef[:, 1 + axis] = accel[:, axis], -drone.DRAG
            rows.append(coef)
            rhs.append(thrust[axis] - drone.DRAG * obs[:, 2 + axis])
        obs = res.obs
    for i in range(16):
        a = np.stack([r[i] for r in rows])
        b = np.array([r[i] for r in rhs])
        mass, wind_x, wind_z = np.linalg.lstsq(a, b, rcond=None)[0]
        np.testing.assert_allclose(
            [wind_x, wind_z, mass / drone.MASS_NOMINAL], tasks[i, :3], rtol=1e-3, atol=1e-3
        )


def test_drone_fog_is_sensor_noise_only() -> None:
    """Same seed and actions: fog changes what the drone sees, never where it is (the reward)."""
    clear, foggy = make_family("drone-wind", 8), make_family("drone-wind", 8)
    tasks = clear.sample_tasks(Split.OOD, 8, np.random.default_rng(0))
    tasks_clear = tasks.copy()
    tasks_clear[:, 3] = 0.0
    obs_c = clear.reset(tasks_clear, np.random.default_rng(2))
    obs_f = foggy.reset(tasks, np.random.default_rng(2))
    noise = [obs_f - obs_c]
    for _ in range(20):
        a, b = clear.step(np.tile([1.0, 10.0], (8, 1))), foggy.step(np.tile([1.0, 10.0], (8, 1)))
        np.testing.assert_array_equal(a.reward, b.reward)
        noise.append(b.obs - a.obs)
    noise_std = np.std(np.concatenate(noise), axis=0)
    assert np.all(noise_std > 0.01)
    assert np.all(noise_std < 2.0 * tasks[:, 3].max())


def test_drone_train_observations_are_the_exact_state() -> None:
    env = make_family("drone-wind", 8)
    rng = np.random.default_rng(3)
    obs = env.reset(env.sample_tasks(Split.TRAIN, 8, rng), rng)
    for _ in range(10):
        res = env.step(rng.uniform(drone.THRUST_LOW, drone.THRUST_HIGH, (8, 2)))
        # semi-implicit Euler: p' = p + dt v'
        np.testing.assert_allclose(
            res.obs[:, :2], obs[:, :2] + drone.DT * res.obs[:, 2:], atol=1e-5
        )
        obs = res.obs


def car_rollout(mu: float, steps: int = 60) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(obs, action, next_obs) under hard random actions at friction ``mu``."""
    env = make_family("car-friction", 32)
    rng = np.random.default_rng(4)
    tasks = env.sample_tasks(Split.TRAIN, 32, rng)
    tasks[:, 0] = mu
    obs, out = env.reset(tasks, rng), []
    for _ in range(steps):
        action = rng.uniform(car.SPEC.act_low, car.SPEC.act_high, (32, 2))
        res = env.step(action)
        out.append((obs, action, res.obs, tasks))
        obs = res.obs
    return out


def realized_accelerations(obs: np.ndarray, next_obs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Longitudinal and lateral acceleration (m/s^2) recovered from one transition."""
    v = obs[:, 2].astype(np.float64)
    a_x = (next_obs[:, 2] - obs[:, 2]) / car.DT
    kappa = obs[:, 3] * car.CURVE_AMPLITUDE
    yaw = (next_obs[:, 1].astype(np.float64) - obs[:, 1]) / car.DT + v * kappa
    return a_x, yaw * np.maximum(v, 1.0)


@pytest.mark.parametrize("mu", [0.15, 0.4, 1.0])
def test_car_accelerations_stay_inside_the_friction_circle(mu: float) -> None:
    norms = []
    for obs, _, nxt, _ in car_rollout(mu):
        ok = (np.abs(nxt[:, 0]) < car.RAIL) & (nxt[:, 2] > 0.0) & (obs[:, 2] > 1.0)
        ok &= np.abs(nxt[:, 1]) < 3.0  # no heading wrap-around
        a_x, a_y = realized_accelerations(obs[ok], nxt[ok])
        norms.append(np.hypot(a_x, a_y))
    norms = np.concatenate(norms)
    limit = mu * car.GRAVITY
    assert norms.max() <= limit * 1.001 + 1e-3
    assert norms.max() >= limit * 0.98  # the tyres do saturate in this test


def test_car_steering_bias_is_recoverable_from_one_unsaturated_transition() -> None:
    checked = 0
    for obs, action, nxt, tasks in car_rollout(1.0, steps=10):
        ok = (np.abs(nxt[:, 0]) < car.RAIL) & (nxt[:, 2] > 1.0)
        _, a_y = realized_accelerations(obs, nxt)
        ok &= np.hypot(action[:, 1], a_y) < 0.9 * car.GRAVITY  # tyres not saturated
        v = obs[:, 2].astype(np.float64)
        bias = np.arctan(a_y * car.WHEELBASE / v**2) - action[:, 0]
        np.testing.assert_allclose(bias[ok], tasks[ok, 1], atol=2e-4)
        checked += int(ok.sum())
    assert checked > 50


def test_held_out_cells_partition_the_box() -> None:
    cells = HeldOutCells([0.0, -1.0, 10.0], [1.0, 1.0, 20.0], cells=5, test_fraction=0.2, seed=7)
    train, test = cells.cell_ids(Split.TRAIN), cells.cell_ids(Split.TEST)
    assert len(test) == 25 and len(train) == 100
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(range(125))
    rng = np.random.default_rng(0)
    for split, ids in ((Split.TRAIN, train), (Split.TEST, test)):
        points = cells.sample(split, 5000, rng)
        assert cells.in_box(points).all()
        assert set(cells.flat_cell(points)) == set(ids)  # every cell of the split, none else
    corners = np.array([[0.0, -1.0, 10.0], [1.0, 1.0, 20.0]])
    assert cells.flat_cell(corners).tolist() == [0, 124]
