"""PEARL's export declaration (see :mod:`export.family`): a Gaussian belief over the task latent.

State: ``(precision, eta)`` (diagonal factors) or ``(cov, mean)`` (factors with rank-one
directions), at the N(0, prior_var I) prior; param ``forget``. Graphs: ``step`` (fused belief
update + action), ``act`` (action at the belief mean) and ``encoder`` (the per-transition factor,
for diagnostics and ``bench belief``).
"""

from __future__ import annotations

from typing import Any

from export.reference import dims_of, reference_modules
from export.verify import PARITY_TARGET
from runtime.adaptation import ParamSpec, PearlAdaptation, StateSpec

__all__ = ["PARITY_TARGET", "adaptation", "dims_of", "parity_target", "reference_modules"]

#: Full beliefs: the posterior amplifies the encoder's float32 rounding differences on
#: ill-conditioned random beliefs (measured 9.2e-6 on point-nav, little margin; export.verify).
PARITY_TARGET_FULL = 1e-4


def parity_target(run: Any) -> float:
    return PARITY_TARGET_FULL if run.config.model.factor_rank > 0 else PARITY_TARGET


def adaptation(run: Any, recording: Any = None) -> PearlAdaptation:
    """The manifest declaration of a PEARL run's belief: its two state tensors at the prior
    and the forgetting factor."""
    cfg = run.config
    m = cfg.model
    z = m.latent_dim
    if m.factor_rank > 0:
        eye = [m.prior_var if i == j else 0.0 for i in range(z) for j in range(z)]
        state = [
            StateSpec(name="cov", shape=[z, z], init=eye),
            StateSpec(name="mean", shape=[z], init=0.0),
        ]
    else:
        state = [
            StateSpec(name="precision", shape=[z], init=1.0 / m.prior_var),
            StateSpec(name="eta", shape=[z], init=0.0),
        ]
    forget = ParamSpec(
        name="forget", default=cfg.pearl.forget, low=1e-3, high=1.0,
        description="forgetting factor: < 1 discounts old evidence toward the prior",
    )  # fmt: skip
    return PearlAdaptation(
        state=state, params=[forget], summary_names=[f"z{i}" for i in range(z)],
        latent_dim=z, factor_rank=m.factor_rank, factor_diagonal=m.factor_diagonal,
        factor_var=m.factor_var, prior_var=m.prior_var, min_var=m.min_var,
    )  # fmt: skip
