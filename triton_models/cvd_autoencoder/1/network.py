"""Autoencoder with a risk head of the ``cvd_autoencoder`` Triton model: the risk of a
cardiovascular event from a patient's latest profile, how well the profile fits the training
population (reconstruction error, out-of-distribution flag), and how much each variable raised
the risk.

This file runs in two places: inside Triton's python backend (loaded by explicit path from the
model version directory, with no repository on ``sys.path``) and in ``../train.py``. It imports
only torch and the standard library; the variable order and the physiological limits are
copied here from ``ingest.ehr.schema`` and a test checks that they still agree.

Inputs (``workers.ehr.features.latest_profile``, canonical units): ``VALUES`` [B, 10] and
``OBSERVED`` [B, 10] (1 measured, 0 never measured).

Architecture:

* Input = [standardised values (training mean/std of the observed values; 0 where not
  observed), observed mask]: 20 numbers.
* Encoder 20 → 32 → 16 → latent code (6 by default); decoder latent → 16 → 32 → 10
  reconstructs the standardised profile; a risk head latent → 16 → 1 gives the risk logit.
  Trained jointly: reconstruction MSE over the observed variables + binary cross-entropy, with
  observed variables hidden from the encoder at random (denoising), so the code has to capture
  how the variables go together rather than copy them.
* ``RECON_ERROR``: mean squared error of the reconstruction over the observed variables, in
  standardised units. ``OOD``: ``RECON_ERROR`` above a threshold fixed at training time (a
  high percentile on validation patients; it travels in the state dict as ``ood_threshold``).
* Contributions (:func:`predict`): occlusion. For each variable j, the profile with j masked out
  (observed 0, value 0) goes through the network in the same batched pass;
  ``CONTRIBUTION[j] = logit(as is) − logit(j masked)``; exactly 0 for a variable not observed.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor, nn

#: Input columns, in order: ``ingest.ehr.schema.model_schema("cvd_autoencoder").variables``.
VARIABLES: tuple[str, ...] = (
    "age",
    "sex",
    "sbp",
    "dbp",
    "bmi",
    "total_cholesterol",
    "hdl",
    "ldl",
    "smoker",
    "hba1c",
)
N_FEATURES = len(VARIABLES)
#: Hard physiological limits (canonical units) of each input: ``ingest.ehr.schema.VARIABLES``.
LIMITS: tuple[tuple[float, float], ...] = (
    (0.0, 120.0),
    (0.0, 1.0),
    (50.0, 300.0),
    (20.0, 200.0),
    (10.0, 90.0),
    (1.0, 25.0),
    (0.1, 5.0),
    (0.1, 20.0),
    (0.0, 1.0),
    (3.0, 20.0),
)
#: Variables that are flags (exactly 0 or 1 when observed): sex (1 = male), smoker.
FLAGS: tuple[bool, ...] = tuple(v in ("sex", "smoker") for v in VARIABLES)
_SLACK = 1e-3

INPUT_NAMES = ("VALUES", "OBSERVED")


class Prediction(NamedTuple):
    risk: Tensor  # [B] float32 in [0, 1]
    logit: Tensor  # [B]
    recon_error: Tensor  # [B] float32 ≥ 0
    ood: Tensor  # [B] bool
    contribution: Tensor  # [B, 10], logit(as is) − logit(variable masked)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class CVDAutoencoder(nn.Module):
    """(values, observed) → (risk logit [B], reconstruction [B, F], standardised input [B, F])."""

    value_mean: Tensor
    value_std: Tensor
    ood_threshold: Tensor

    def __init__(self, latent: int = 6, width: int = 32, head: int = 16) -> None:
        super().__init__()
        # normalisation statistics and OOD threshold (set by ../train.py; in the state dict)
        self.register_buffer("value_mean", torch.zeros(N_FEATURES))
        self.register_buffer("value_std", torch.ones(N_FEATURES))
        self.register_buffer("ood_threshold", torch.tensor(float("inf")))
        self.encoder = _mlp([2 * N_FEATURES, width, width // 2, latent])
        self.decoder = _mlp([latent, width // 2, width, N_FEATURES])
        self.risk_head = _mlp([latent, head, 1])

    def standardise(self, values: Tensor, observed: Tensor) -> Tensor:
        """Standardised values, 0 where not observed."""
        return torch.where(observed > 0.5, (values - self.value_mean) / self.value_std, 0.0)

    def forward(
        self, values: Tensor, observed: Tensor, hidden: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``hidden`` (training only): observed variables withheld from the encoder; the
        reconstruction target still has them."""
        z = self.standardise(values, observed)
        seen = observed if hidden is None else observed * (1.0 - hidden)
        code = self.encoder(torch.cat([z * seen, seen], dim=-1))
        return self.risk_head(code).squeeze(-1), self.decoder(code), z


def reconstruction_error(recon: Tensor, z: Tensor, observed: Tensor) -> Tensor:
    """Mean squared error over the observed variables of each row [B]."""
    obs = (observed > 0.5).to(recon.dtype)
    return ((recon - z) ** 2 * obs).sum(dim=-1) / obs.sum(dim=-1).clamp(min=1.0)


def build_from_payload(payload: dict) -> CVDAutoencoder:
    """The network stored in a ``weights.pt`` payload (see ``../train.py``), in eval mode."""
    if tuple(payload["variables"]) != VARIABLES:
        raise ValueError(
            f"weights.pt was trained on variables {payload['variables']}, network.py declares "
            f"{list(VARIABLES)}; retrain with triton_models/cvd_autoencoder/train.py"
        )
    model = CVDAutoencoder(**payload["network_kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def validate_inputs(inputs: dict[str, Tensor]) -> str | None:
    """Why one request's inputs are malformed, or ``None`` if the model may take them.

    Checked: shapes [B, 10], float32, a common batch size, every number finite, ``OBSERVED`` 0
    or 1 with at least one observed variable per patient, observed ``VALUES`` inside the
    physiological limits (canonical units), flags exactly 0 or 1.
    """
    batch = int(inputs["VALUES"].shape[0]) if inputs["VALUES"].dim() else 0
    for name in INPUT_NAMES:
        t = inputs[name]
        if t.dim() != 2 or int(t.shape[1]) != N_FEATURES:
            return f"{name} must have shape [B, {N_FEATURES}], got {list(t.shape)}"
        if t.dtype != torch.float32:
            return f"{name} must be float32, got {str(t.dtype).removeprefix('torch.')}"
        if int(t.shape[0]) != batch:
            return f"inputs disagree on the batch size: {name} has {int(t.shape[0])}, not {batch}"
        if not bool(torch.isfinite(t).all()):
            i = int((~torch.isfinite(t)).any(dim=1).nonzero()[0])
            return f"{name}[{i}] contains NaN or infinite values"
    values, observed = inputs["VALUES"].cpu(), inputs["OBSERVED"].cpu()
    if bool(((observed != 0) & (observed != 1)).any()):
        i = int(((observed != 0) & (observed != 1)).any(dim=1).nonzero()[0])
        return f"OBSERVED[{i}] holds values other than 0 and 1"
    empty = observed.sum(dim=1) == 0
    if bool(empty.any()):
        i = int(empty.nonzero()[0])
        return f"OBSERVED[{i}] is all 0: no variable of this model was measured, nothing to score"
    lo = torch.tensor([a for a, _ in LIMITS]) - _SLACK
    hi = torch.tensor([b for _, b in LIMITS]) + _SLACK
    flag = torch.tensor(FLAGS)
    bad = (observed == 1) & ((values < lo) | (values > hi) | (flag & (values != 0) & (values != 1)))
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        a, b = LIMITS[j]
        what = "a flag, 0 or 1" if FLAGS[j] else f"physiological range [{a:g}, {b:g}]"
        return (
            f"VALUES[{i}]: {VARIABLES[j]} {float(values[i, j]):.4g} is outside its {what} "
            "(canonical units expected)"
        )
    return None


def predict(
    model: CVDAutoencoder, values: Tensor, observed: Tensor, device: torch.device
) -> Prediction:
    """The serving path in one place (Triton's model.py, tests, train.py): risk, reconstruction
    error, OOD flag and occlusion contributions of a batch, in one forward pass, on the CPU."""
    b = values.shape[0]
    values, observed = values.float(), observed.float()
    keep = torch.cat([torch.ones(1, N_FEATURES), 1.0 - torch.eye(N_FEATURES)])[:, None, :]
    vals = (values[None] * keep).reshape(-1, N_FEATURES)
    obs = (observed[None] * keep).reshape(-1, N_FEATURES)
    with torch.inference_mode():
        logits, recon, z = model(vals.to(device), obs.to(device))
        error = reconstruction_error(recon[:b], z[:b], obs[:b].to(device))
        ood = error > model.ood_threshold
    logits = logits.float().cpu().reshape(N_FEATURES + 1, b)
    full = logits[0]
    contribution = (full[None, :] - logits[1:]).T.contiguous()
    return Prediction(torch.sigmoid(full), full, error.float().cpu(), ood.cpu(), contribution)
