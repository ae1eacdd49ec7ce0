"""LSTM with additive attention of the ``diabetes_lstm_attention`` Triton model: the risk of a
diabetes complication from a patient's visit sequence, which visits the model looked at, and
how much each variable raised the risk.

This file runs in two places: inside Triton's python backend (loaded by explicit path from the
model version directory, with no repository on ``sys.path``) and in ``../train.py``. It imports
only torch and the standard library; the variable order and the physiological limits are
copied here from ``ingest.ehr.schema`` and a test checks that they still agree.

Inputs (``workers.ehr.features.visit_sequence`` / ``stack_sequences``, canonical units):
``VALUES`` [B, 20, 10], ``OBSERVED`` [B, 20, 10] (1 measured, 0 not), ``DT_YEARS`` [B, 20]
(years since the previous visit, 0 for the first), ``LENGTH`` [B, 1] int32 (real visits,
left-aligned, 1–20). Positions ``>= LENGTH`` are padding and are ignored whatever they hold.

Architecture:

* Per visit, input = [standardised values (training mean/std of the observed values; 0 where
  not observed), observed mask, standardised log1p(dt_years)]: 21 numbers. Padded visits are
  zeroed before the LSTM.
* A one-layer unidirectional LSTM. It reads oldest → newest and the visits are left-aligned,
  so the output at a real visit depends only on that visit and the ones before it: padding
  after ``LENGTH`` cannot leak into it (no packing needed; tested).
* Additive attention: ``score_t = v · tanh(W h_t + b)``, padded visits set to −inf before the
  softmax, so their weight is exactly 0 and the real visits' weights sum to 1.
* Risk head: a small MLP on the attention-pooled context ``Σ_t a_t h_t`` → logit → sigmoid.
* Contributions (:func:`predict`): gradient × input, the first-order estimate of the occlusion
  effect from one forward and one backward pass. Occlusion (:func:`predict_occlusion`, the
  reference): for each variable j, the same sequence with j masked out at every visit (observed
  0, value 0); ``logit(as is) − logit(j masked)``. Both are positive when the variable, as
  measured, raises the risk, and exactly 0 for a variable never observed. Training masks whole
  variables at random, so "variable absent" is a state the network knows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

#: Input columns, in order: ``ingest.ehr.schema.model_schema("diabetes_lstm_attention").variables``.
VARIABLES: tuple[str, ...] = (
    "age",
    "hba1c",
    "glucose",
    "sbp",
    "dbp",
    "bmi",
    "ldl",
    "hdl",
    "triglycerides",
    "egfr",
)
#: Visits per sequence: ``model_schema("diabetes_lstm_attention").max_visits``.
MAX_VISITS = 20
N_FEATURES = len(VARIABLES)
#: Hard physiological limits (canonical units) of each input: ``ingest.ehr.schema.VARIABLES``.
#: An observed value outside is a unit slip the ingest should have rejected.
LIMITS: tuple[tuple[float, float], ...] = (
    (0.0, 120.0),
    (3.0, 20.0),
    (1.0, 60.0),
    (50.0, 300.0),
    (20.0, 200.0),
    (10.0, 90.0),
    (0.1, 20.0),
    (0.1, 5.0),
    (0.1, 60.0),
    (1.0, 200.0),
)
#: Largest gap between two visits accepted, in years.
MAX_DT_YEARS = 120.0
#: Float slack on the limits (values arrive as float32).
_SLACK = 1e-3

INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "VALUES": (MAX_VISITS, N_FEATURES),
    "OBSERVED": (MAX_VISITS, N_FEATURES),
    "DT_YEARS": (MAX_VISITS,),
    "LENGTH": (1,),
}
INPUT_DTYPES: dict[str, torch.dtype] = {
    "VALUES": torch.float32,
    "OBSERVED": torch.float32,
    "DT_YEARS": torch.float32,
    "LENGTH": torch.int32,
}


class Prediction(NamedTuple):
    risk: Tensor  # [B] float32 in [0, 1]
    logit: Tensor  # [B]
    attention: Tensor  # [B, 20], 0 on padding, sums to 1 over the real visits
    contribution: Tensor  # [B, 10], logit(as is) − logit(variable masked)


class DiabetesLSTMAttention(nn.Module):
    """(values, observed, dt_years, length) → (logit [B], attention [B, V])."""

    value_mean: Tensor
    value_std: Tensor
    dt_mean: Tensor
    dt_std: Tensor

    def __init__(self, hidden: int = 48, attention: int = 32, head: int = 32) -> None:
        super().__init__()
        # normalisation statistics (set by ../train.py; travel in the state dict)
        self.register_buffer("value_mean", torch.zeros(N_FEATURES))
        self.register_buffer("value_std", torch.ones(N_FEATURES))
        self.register_buffer("dt_mean", torch.zeros(()))
        self.register_buffer("dt_std", torch.ones(()))
        self.lstm = nn.LSTM(2 * N_FEATURES + 1, hidden, batch_first=True)
        self.attn_proj = nn.Linear(hidden, attention)
        self.attn_score = nn.Linear(attention, 1, bias=False)
        self.head = nn.Sequential(nn.Linear(hidden, head), nn.GELU(), nn.Linear(head, 1))

    def encode(self, values: Tensor, observed: Tensor, dt_years: Tensor, real: Tensor) -> Tensor:
        """Per-visit network input [B, V, 21]; padded visits all zero."""
        obs = (observed > 0.5) & real[..., None]
        z = torch.where(obs, (values - self.value_mean) / self.value_std, 0.0)
        dt = (torch.log1p(dt_years.clamp(0.0, MAX_DT_YEARS)) - self.dt_mean) / self.dt_std
        dt = torch.where(real, dt, 0.0)
        return torch.cat([z, obs.to(z.dtype), dt[..., None]], dim=-1)

    def forward(
        self, values: Tensor, observed: Tensor, dt_years: Tensor, length: Tensor
    ) -> tuple[Tensor, Tensor]:
        real = visits_mask(values.shape[1], length)
        return self.attend(self.encode(values, observed, dt_years, real), real)

    def attend(self, encoded: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
        """(logit [B], attention [B, V]) from the per-visit input of :meth:`encode`."""
        out, _ = self.lstm(encoded)
        scores = self.attn_score(torch.tanh(self.attn_proj(out))).squeeze(-1)
        attention = torch.softmax(scores.masked_fill(~real, float("-inf")), dim=1)
        context = (attention[..., None] * out).sum(dim=1)
        return self.head(context).squeeze(-1), attention


def visits_mask(steps: int, length: Tensor) -> Tensor:
    """[B, steps] True on each patient's real visits (the first ``LENGTH``)."""
    return torch.arange(steps, device=length.device)[None, :] < length.reshape(-1, 1)


def build_from_payload(payload: dict) -> DiabetesLSTMAttention:
    """The network stored in a ``weights.pt`` payload (see ``../train.py``), in eval mode."""
    if tuple(payload["variables"]) != VARIABLES or int(payload["max_visits"]) != MAX_VISITS:
        raise ValueError(
            f"weights.pt was trained on variables {payload['variables']} / "
            f"{payload['max_visits']} visits, network.py declares {list(VARIABLES)} / "
            f"{MAX_VISITS}; retrain with triton_models/diabetes_lstm_attention/train.py"
        )
    model = DiabetesLSTMAttention(**payload["network_kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def validate_inputs(inputs: dict[str, Tensor]) -> str | None:
    """Why one request's inputs are malformed, or ``None`` if the model may take them.

    Checked: shapes, dtypes and a common batch size; every number finite; ``LENGTH`` in
    [1, 20]; on the real visits, ``OBSERVED`` 0 or 1, observed ``VALUES`` inside the
    physiological limits (canonical units) and ``DT_YEARS`` in [0, 120]. Padding is not
    checked beyond finiteness: the model ignores it.
    """
    batch = int(inputs["VALUES"].shape[0]) if inputs["VALUES"].dim() else 0
    for name, dims in INPUT_SHAPES.items():
        t = inputs[name]
        if t.dim() != len(dims) + 1 or tuple(t.shape[1:]) != dims:
            return f"{name} must have shape [B, {', '.join(map(str, dims))}], got {list(t.shape)}"
        if t.dtype != INPUT_DTYPES[name]:
            want = str(INPUT_DTYPES[name]).removeprefix("torch.")
            return f"{name} must be {want}, got {str(t.dtype).removeprefix('torch.')}"
        if int(t.shape[0]) != batch:
            return f"inputs disagree on the batch size: {name} has {int(t.shape[0])}, not {batch}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            i = int((~torch.isfinite(t)).reshape(batch, -1).any(dim=1).nonzero()[0])
            return f"{name}[{i}] contains NaN or infinite values"
    length = inputs["LENGTH"].reshape(-1)
    bad = (length < 1) | (length > MAX_VISITS)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        return f"LENGTH[{i}] is {int(length[i])}; it must be in [1, {MAX_VISITS}] (real visits)"
    real = torch.arange(MAX_VISITS)[None, :] < length[:, None].cpu()
    observed = inputs["OBSERVED"].cpu()
    not_flag = real[..., None] & (observed != 0) & (observed != 1)
    if bool(not_flag.any()):
        i = int(not_flag.reshape(batch, -1).any(dim=1).nonzero()[0])
        return f"OBSERVED[{i}] holds values other than 0 and 1 on its real visits"
    values = inputs["VALUES"].cpu()
    lo = torch.tensor([a for a, _ in LIMITS]) - _SLACK
    hi = torch.tensor([b for _, b in LIMITS]) + _SLACK
    out = real[..., None] & (observed == 1) & ((values < lo) | (values > hi))
    if bool(out.any()):
        i, v, j = (int(x) for x in out.nonzero()[0])
        a, b = LIMITS[j]
        return (
            f"VALUES[{i}] visit {v}: {VARIABLES[j]} {float(values[i, v, j]):.4g} is outside "
            f"its physiological range [{a:g}, {b:g}] (canonical units expected)"
        )
    dt = inputs["DT_YEARS"].cpu()
    bad_dt = real & ((dt < 0) | (dt > MAX_DT_YEARS))
    if bool(bad_dt.any()):
        i = int(bad_dt.any(dim=1).nonzero()[0])
        return f"DT_YEARS[{i}] must be in [0, {MAX_DT_YEARS:g}] years on its real visits"
    return None


def occlusion_batch(
    values: Tensor, observed: Tensor, dt_years: Tensor, length: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The batch followed by one copy per variable with that variable masked at every visit:
    [(1 + F)·B, ...], block k ≥ 1 masking variable k − 1."""
    b = values.shape[0]
    keep = torch.cat([torch.ones(1, N_FEATURES), 1.0 - torch.eye(N_FEATURES)]).to(values)
    keep = keep[:, None, None, :]  # [1 + F, 1, 1, F]
    vals = (values[None] * keep).reshape(-1, *values.shape[1:])
    obs = (observed[None] * keep).reshape(-1, *observed.shape[1:])
    reps = N_FEATURES + 1
    return vals, obs, dt_years.repeat(reps, 1), length.reshape(b, 1).repeat(reps, 1)


#: Patients per LSTM pass on a CPU. The occlusion batch of 64 patients (704 sequences) keeps the
#: LSTM's activations in cache; a request of 256 at once runs about twice as slow per patient
#: on the same core (measured, one torch thread).
CPU_SUB_BATCH = 64


def _occluded_logits(
    model: DiabetesLSTMAttention,
    values: Tensor,
    observed: Tensor,
    dt_years: Tensor,
    length: Tensor,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Logits [1 + F, b] (as is, then each variable masked) and attention [b, steps]."""
    b = values.shape[0]
    batch = occlusion_batch(values, observed, dt_years, length)
    with torch.inference_mode():
        logits, attention = model(*(t.to(device) for t in batch))
    return logits.float().cpu().reshape(N_FEATURES + 1, b), attention[:b].float().cpu()


def _gradient_logits(
    model: DiabetesLSTMAttention,
    values: Tensor,
    observed: Tensor,
    dt_years: Tensor,
    length: Tensor,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits [b], attention [b, steps] and gradient × input contributions [b, F] of one piece:
    one forward and one backward pass."""
    values, observed, dt_years, length = (
        t.to(device) for t in (values, observed, dt_years, length)
    )
    real = visits_mask(values.shape[1], length)
    # cuDNN's LSTM has no backward in eval mode ("cudnn RNN backward can only be called in
    # training mode"): on a GPU the pass runs torch's own LSTM kernels instead.
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.backends.cudnn.flags(enabled=device.type != "cuda"),
    ):
        encoded = model.encode(values, observed, dt_years, real).detach().requires_grad_(True)
        logits, attention = model.attend(encoded, real)
        # each patient's logit depends on its own sequence only: one backward pass of the sum
        # gives every patient's gradient
        (grad,) = torch.autograd.grad(logits.sum(), encoded)
    # Masking variable j sets its standardised values and its observed flags to 0 at every
    # visit: the first-order change of the logit is Σ_visits (x · ∂logit/∂x) over both.
    effect = (grad * encoded).detach()
    contribution = effect[..., :N_FEATURES].sum(dim=1) + effect[..., N_FEATURES:-1].sum(dim=1)
    return (
        logits.detach().float().cpu(),
        attention.detach().float().cpu(),
        contribution.float().cpu(),
    )


def _pieces(length: Tensor, steps: int, device: torch.device) -> list[tuple[Tensor, int]]:
    """The batch's pieces (patient indices) and the step each is cut after. On a CPU the
    patients run in pieces of :data:`CPU_SUB_BATCH`, grouped by visit count, each piece cut after
    its longest patient's last visit: padding after a patient's visits cannot change its outputs
    (see the module docstring), so this only skips work. A GPU takes the batch whole."""
    if device.type != "cpu":
        pieces = [torch.arange(length.shape[0])]
    else:
        pieces = list(torch.argsort(length.reshape(-1), stable=True).split(CPU_SUB_BATCH))
    return [
        (idx, min(steps, max(1, int(length[idx].max()))) if idx.numel() else 1) for idx in pieces
    ]


def predict(
    model: DiabetesLSTMAttention,
    values: Tensor,
    observed: Tensor,
    dt_years: Tensor,
    length: Tensor,
    device: torch.device,
) -> Prediction:
    """The serving path in one place (Triton's model.py, tests, train.py): the risk, the
    attention and each variable's contribution to the logit by gradient × input, with the
    masked variable (values and observed flags 0) as the baseline: the first-order estimate of
    the occlusion effect (:func:`predict_occlusion`), from one forward and one backward pass
    instead of 1 + F forward passes. Exactly 0 for a variable never observed.

    The patients run in the pieces of :func:`_pieces`.
    """
    b, steps = values.shape[0], values.shape[1]
    values, observed, dt_years = values.float(), observed.float(), dt_years.float()
    length = length.reshape(-1, 1).long()
    logits = torch.empty(b)
    attention = torch.zeros(b, steps)
    contribution = torch.zeros(b, N_FEATURES)
    for idx, cut in _pieces(length, steps, device):
        part_logits, part_attention, part_contribution = _gradient_logits(
            model,
            values[idx, :cut],
            observed[idx, :cut],
            dt_years[idx, :cut],
            length[idx],
            device,
        )
        logits[idx] = part_logits
        attention[idx, :cut] = part_attention
        contribution[idx] = part_contribution
    return Prediction(torch.sigmoid(logits), logits, attention, contribution)


def predict_occlusion(
    model: DiabetesLSTMAttention,
    values: Tensor,
    observed: Tensor,
    dt_years: Tensor,
    length: Tensor,
    device: torch.device,
) -> Prediction:
    """The risk, the attention and the occlusion contributions of a batch: the reference the
    served gradient × input contributions (:func:`predict`) are checked against, and what
    ``../train.py`` records for the reference patients.

    The patients run in the pieces of :func:`_pieces`.
    """
    b, steps = values.shape[0], values.shape[1]
    values, observed, dt_years = values.float(), observed.float(), dt_years.float()
    length = length.reshape(-1, 1).long()
    logits = torch.empty(N_FEATURES + 1, b)
    attention = torch.zeros(b, steps)
    for idx, cut in _pieces(length, steps, device):
        part_logits, part_attention = _occluded_logits(
            model,
            values[idx, :cut],
            observed[idx, :cut],
            dt_years[idx, :cut],
            length[idx],
            device,
        )
        logits[:, idx] = part_logits
        attention[idx, :cut] = part_attention
    full = logits[0]
    contribution = (full[None, :] - logits[1:]).T.contiguous()
    return Prediction(torch.sigmoid(full), full, attention, contribution)
