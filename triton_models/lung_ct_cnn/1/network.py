"""2.5D CNN of the ``lung_ct_cnn`` Triton model: does a chest CT contain a nodule-like lesion,
and on which slices?

This file runs in two places: inside Triton's python backend (loaded by explicit path from the
model version directory, with no repository on ``sys.path``) and in ``../train.py``. It imports
only torch and the standard library; the input grid and lung window are copied here as constants
and a test checks they still equal ``workers.dicom.preprocess``.

Input: ``volumes`` float32 [B, 64, 128, 128], the output of
``workers.dicom.preprocess.model_input`` (lung window scaled to [0, 1], slices feet → head).

Architecture:

* Each grid slice is stacked with its two neighbours (edge slices repeat themselves) into a
  3-channel 128 × 128 image, so the 2D network sees a little of the third dimension: a vessel
  continues on the neighbouring slices, a nodule ends.
* :class:`SliceEncoder`: six 3 × 3 convolutions with batch norm and leaky ReLU (3 of stride 2,
  16-32-32-48-48-64 channels), a 1 × 1 head → a 16 × 16 lesion logit map per slice (one logit
  per 8 × 8-pixel cell). Fully convolutional: ``../train.py`` trains it on crops.
* Slice logit: the maximum of the slice's map.
* Slice scores: ``sigmoid(slice_scale · logit + slice_bias)`` (Platt scaling fitted on the
  validation volumes, so that they are probabilities on the data distribution rather than on the
  balanced training batches).
* Study probability: attention pooling over the 64 slice logits,
  ``w = softmax(logit / tau)``, ``pooled = Σ w · logit`` (a smooth maximum), then
  ``sigmoid(study_scale · pooled + study_bias)``; ``tau``, ``study_scale`` and ``study_bias``
  are fitted on the validation volumes with the encoder frozen.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

#: Model input grid (slices, rows, columns): ``workers.dicom.preprocess.GRID``.
GRID: tuple[int, int, int] = (64, 128, 128)
#: Lung window (centre, width) in HU: ``workers.dicom.preprocess.WINDOW_CENTER_HU`` / ``_WIDTH_HU``.
WINDOW: tuple[float, float] = (-600.0, 1500.0)
#: Chunk of grid slices pushed through the encoder at once (bounds memory for large batches).
SLICE_CHUNK = 256


class Prediction(NamedTuple):
    study_prob: Tensor  # [B] float32 in [0, 1]
    slice_scores: Tensor  # [B, 64] float32 in [0, 1]
    attention: Tensor  # [B, 64] float32, rows sum to 1
    slice_logits: Tensor  # [B, 64] raw encoder logits


def neighbour_stack(volumes: Tensor) -> Tensor:
    """[B, S, H, W] → [B·S, 3, H, W]: each slice with the one below and above (edges repeat)."""
    b, s, h, w = volumes.shape
    padded = torch.cat([volumes[:, :1], volumes, volumes[:, -1:]], dim=1)
    stacked = torch.stack([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]], dim=2)
    return stacked.reshape(b * s, 3, h, w)


def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.1, inplace=True),
    ]


class SliceEncoder(nn.Module):
    """3-channel slice images [N, 3, 128, 128] → lesion logit maps [N, 16, 16] (stride 8)."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 48, 64), head: int = 32):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.features = nn.Sequential(
            *_conv(3, w1, 2),
            *_conv(w1, w2, 2),
            *_conv(w2, w2, 1),
            *_conv(w2, w3, 2),
            *_conv(w3, w3, 1),
            *_conv(w3, w4, 1),
        )
        self.head = nn.Sequential(
            nn.Conv2d(w4, head, 1), nn.LeakyReLU(0.1, inplace=True), nn.Conv2d(head, 1, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(1)


class LungCTNet(nn.Module):
    """Volumes [B, 64, 128, 128] → :class:`Prediction`."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 48, 64), head: int = 32):
        super().__init__()
        self.encoder = SliceEncoder(tuple(widths), head)  # type: ignore[arg-type]
        # calibration / pooling, fitted after the encoder (see ../train.py)
        self.slice_scale = nn.Parameter(torch.ones(()))
        self.slice_bias = nn.Parameter(torch.zeros(()))
        self.log_tau = nn.Parameter(torch.zeros(()))
        self.study_scale = nn.Parameter(torch.ones(()))
        self.study_bias = nn.Parameter(torch.zeros(()))

    def slice_logits(self, volumes: Tensor) -> Tensor:
        """Slice logits [B, S]: the maximum of each slice's lesion map, computed in chunks of
        :data:`SLICE_CHUNK` slices."""
        b, s = volumes.shape[:2]
        x = neighbour_stack(volumes)
        outs = [
            self.encoder(x[i : i + SLICE_CHUNK]).amax(dim=(1, 2))
            for i in range(0, x.shape[0], SLICE_CHUNK)
        ]
        return torch.cat(outs).reshape(b, s)

    def pool(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(study probability [B], slice scores [B, S], attention [B, S]) from slice logits."""
        attention = torch.softmax(logits / self.log_tau.exp(), dim=1)
        pooled = (attention * logits).sum(dim=1)
        study = torch.sigmoid(self.study_scale * pooled + self.study_bias)
        slices = torch.sigmoid(self.slice_scale * logits + self.slice_bias)
        return study, slices, attention

    def forward(self, volumes: Tensor) -> Prediction:
        logits = self.slice_logits(volumes)
        study, slices, attention = self.pool(logits)
        return Prediction(study, slices, attention, logits)


def build_from_payload(payload: dict) -> LungCTNet:
    """The network stored in a ``weights.pt`` payload (see ``../train.py``), in eval mode."""
    if tuple(payload["grid"]) != GRID or tuple(payload["window"]) != WINDOW:
        raise ValueError(
            f"weights.pt was trained on grid {payload['grid']} / window {payload['window']}, "
            f"network.py declares {list(GRID)} / {list(WINDOW)}; retrain with "
            "triton_models/lung_ct_cnn/train.py"
        )
    model = LungCTNet(**payload["network_kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def validate_volumes(volumes: Tensor) -> str | None:
    """Why a request's ``VOLUME`` batch is malformed, or ``None`` if the model may take it."""
    if volumes.dim() != 4 or tuple(volumes.shape[1:]) != GRID:
        return f"VOLUME must have shape [B, {', '.join(map(str, GRID))}], got {list(volumes.shape)}"
    if volumes.dtype != torch.float32:
        return f"VOLUME must be float32, got {volumes.dtype}"
    finite = torch.isfinite(volumes)
    if not bool(finite.all()):
        i = int((~finite).reshape(volumes.shape[0], -1).any(dim=1).nonzero()[0])
        return f"VOLUME[{i}] contains NaN or infinite values"
    lo, hi = float(volumes.min()), float(volumes.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        return (
            f"VOLUME values must be lung-windowed into [0, 1] "
            f"(workers.dicom.preprocess.model_input), got min {lo:.4g}, max {hi:.4g}"
        )
    return None


def predict(model: LungCTNet, volumes: Tensor, device: torch.device) -> Prediction:
    """The serving path in one place (Triton's model.py, tests, train.py): volumes
    [B, 64, 128, 128] → :class:`Prediction` on the CPU, float32."""
    with torch.inference_mode():
        out = model(volumes.to(device=device, dtype=torch.float32))
    return Prediction(*(t.float().cpu() for t in out))
