"""The deterministic training run shared by the reference models' ``train.py`` scripts:
seeding, the optimiser (AdamW with a one-cycle schedule) and its loops — by epochs over rows in
a fixed shuffled order, or by a fixed number of steps — with a progress display, timing, and
writing ``weights.pt`` / ``metrics.json`` / the model card. One copy, so that every model is
rebuilt bit for bit the same way: fixed seeds, deterministic algorithms, one torch thread and a
fixed data order give bit-identical weights on every rerun, and ``metrics.json`` records the
SHA-256 of the state dict tensors. torch, rich and scikit-learn are imported inside the
functions (training-only dependencies)."""

from __future__ import annotations

import hashlib
import json
import platform
import random
import time
from argparse import ArgumentParser
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch.optim.lr_scheduler import LRScheduler


class OptimiserSettings(Protocol):
    """What the loop needs from the parsed command line."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float


def seed_everything(seed: int) -> None:
    """Seed every generator and make torch deterministic on one thread (bit-identical reruns)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def optimiser_hyperparameters(args: OptimiserSettings) -> dict[str, Any]:
    """The loop's settings as recorded in ``metrics.json`` and the weights payload."""
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
    }


class OneCycle:
    """AdamW under a one-cycle learning-rate schedule of ``total_steps`` steps (warm-up over the
    first ``pct_start`` of them), optionally clipping the gradient norm."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        weight_decay: float,
        total_steps: int,
        pct_start: float,
        clip_norm: float | None,
    ) -> None:
        import torch

        self.params = list(params)
        self.clip_norm = clip_norm
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.sched: LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=lr, total_steps=total_steps, pct_start=pct_start
        )

    def step(self, loss: torch.Tensor) -> None:
        """One descent step on ``loss``, then the schedule's next learning rate."""
        import torch

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.opt.step()
        self.sched.step()


def progress_bar() -> Any:
    """The rich progress display of a training loop (``info``: the latest progress line)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )


#: One minibatch: (indices, the loop's generator) → (loss to minimise, named floats to average),
#: or ``None`` to skip it (no step; the schedule still counts it).
Step = Callable[["torch.Tensor", "torch.Generator"], tuple["torch.Tensor", dict[str, float]] | None]
#: End of an epoch (0-based, model in eval mode, per-step means of the named floats) →
#: (its ``history`` entry, the progress line).
EpochEnd = Callable[[int, dict[str, float]], tuple[dict[str, Any], str]]


def train_epochs(
    model: torch.nn.Module,
    n: int,
    args: OptimiserSettings,
    seed: int,
    step: Step,
    end_epoch: EpochEnd,
    *,
    pct_start: float = 0.15,
    clip_norm: float | None = 1.0,
    description: str = "training",
) -> list[dict[str, Any]]:
    """:class:`OneCycle` over ``n`` training rows for ``args.epochs`` epochs, minibatches in an
    order drawn from a generator seeded with ``seed`` (which ``step`` also draws from); returns
    the history entries of ``end_epoch``. The model is left in eval mode."""
    import torch

    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    total = args.epochs * steps_per_epoch
    optimiser = OneCycle(
        model.parameters(), args.lr, args.weight_decay, total, pct_start, clip_norm
    )
    gen = torch.Generator().manual_seed(seed)
    history = []
    with progress_bar() as progress:
        task = progress.add_task(description, total=total, info="")
        for epoch in range(args.epochs):
            model.train()
            perm = torch.randperm(n, generator=gen)
            sums: dict[str, float] = {}
            for s in range(steps_per_epoch):
                out = step(perm[s * args.batch_size : (s + 1) * args.batch_size], gen)
                if out is not None:
                    optimiser.step(out[0])
                    for key, value in out[1].items():
                        sums[key] = sums.get(key, 0.0) + value
                progress.advance(task)
            model.eval()
            entry, info = end_epoch(epoch, {k: v / steps_per_epoch for k, v in sums.items()})
            history.append(entry)
            progress.update(task, info=info)
    model.eval()
    return history


class StepSettings(Protocol):
    """What :func:`train_steps` needs from the parsed command line."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float


def train_steps(
    model: torch.nn.Module,
    params: Iterable[torch.nn.Parameter],
    args: StepSettings,
    loss_at: Callable[[int], torch.Tensor],
    *,
    pct_start: float,
    clip_norm: float | None = None,
    every: int = 250,
    unit: str = "examples",
) -> list[float]:
    """:class:`OneCycle` on ``params`` for ``args.steps`` steps, the loss of step ``i`` from
    ``loss_at(i)`` (which draws its own minibatch of ``args.batch_size``); returns the mean loss
    of every ``every`` steps (5 decimals). The model trains in train mode and is left in eval
    mode."""
    optimiser = OneCycle(params, args.lr, args.weight_decay, args.steps, pct_start, clip_norm)
    model.train()
    losses, running = [], 0.0
    t0 = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("training", total=args.steps, info="")
        for i in range(args.steps):
            loss = loss_at(i)
            optimiser.step(loss)
            running += float(loss.detach())
            progress.advance(task)
            if (i + 1) % every == 0:
                losses.append(round(running / every, 5))
                running = 0.0
                rate = (i + 1) * args.batch_size / (time.perf_counter() - t0)
                progress.update(task, info=f"loss {losses[-1]:.4f} ({rate:.0f} {unit}/s)")
    model.eval()
    return losses


def time_batch(
    predict: Callable[..., Any], model: torch.nn.Module, inputs: Sequence[torch.Tensor]
) -> float:
    """Median seconds of ``predict(model, *inputs, cpu)`` on the first 64 rows (5 repeats after
    one warm-up)."""
    import torch

    batch = tuple(t[:64] for t in inputs)
    predict(model, *batch, torch.device("cpu"))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        predict(model, *batch, torch.device("cpu"))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def environment(after_torch: Mapping[str, str] | None = None) -> dict[str, str]:
    """The versions a ``metrics.json`` records next to the state-dict hash (``after_torch``:
    the model's own libraries, listed after torch)."""
    import sklearn
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **(after_torch or {}),
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
    }


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's training script writes: ``1/weights.pt``, ``metrics.json`` and
    ``MODEL_CARD.md`` in the model directory ``here``."""

    here: Path

    @classmethod
    def beside(cls, script: str) -> ModelFiles:
        """The files of the model whose directory holds ``script`` (a ``train.py``'s
        ``__file__``)."""
        return cls(Path(script).resolve().parent)

    def load_network(self) -> Any:
        """The model's ``1/network.py``, loaded by path as Triton loads it."""
        from triton_torch_adapter.model_files import load_network

        return load_network(self.version_dir)

    @property
    def version_dir(self) -> Path:
        return self.here / "1"

    @property
    def weights(self) -> Path:
        return self.version_dir / "weights.pt"

    @property
    def metrics(self) -> Path:
        return self.here / "metrics.json"

    @property
    def model_card(self) -> Path:
        return self.here / "MODEL_CARD.md"


def base_parser(
    doc: str | None,
    *,
    splits: tuple[int, int, int] | None = None,
    unit: str = "patients",
    epochs: int | None = None,
    batch_size: int = 256,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
) -> ArgumentParser:
    """The options training scripts share, with the script's defaults: split sizes
    (``--train``/``--val``/``--test`` ``unit``, where it draws its splits), ``--epochs`` (where
    it trains by epochs), the optimiser's settings and ``--dry-run``; the script adds its
    model's options."""
    parser = ArgumentParser(description=(doc or "").split("\n\n")[0])
    if splits is not None:
        for name, default in zip(("train", "val", "test"), splits, strict=True):
            what = {"train": "training", "val": "validation", "test": "test"}[name]
            parser.add_argument(f"--{name}", type=int, default=default, help=f"{what} {unit}")
    if epochs is not None:
        parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--weight-decay", type=float, default=weight_decay)
    parser.add_argument("--dry-run", action="store_true", help="train and report, write nothing")
    return parser


def size_and_hash(model: torch.nn.Module) -> dict[str, Any]:
    """``metrics.json``'s parameter count and state-dict hash of a trained model."""
    from triton_torch_adapter.model_files import state_dict_sha256

    return {
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "state_dict_sha256": state_dict_sha256(model.state_dict()),
    }


def model_record(
    model: torch.nn.Module,
    normalisation: dict[str, Any],
    history: list[dict[str, Any]],
    hyperparameters: dict[str, Any],
) -> dict[str, Any]:
    """An EHR model's part of ``metrics.json``, in its order: normalisation, history,
    hyperparameters, parameter count and state-dict hash."""
    return {
        "normalisation": normalisation,
        "history": history,
        "hyperparameters": hyperparameters,
        **size_and_hash(model),
    }


def timings(
    batch_seconds: float,
    digits: int,
    data_seconds: float,
    train_seconds: float,
    per: str = "64_patients",
) -> dict[str, float]:
    """The informational timing fields of ``metrics.json`` (they differ between reruns);
    ``batch_seconds``: one batch of ``per`` (:func:`time_batch`)."""
    return {
        f"cpu_seconds_per_{per}_1_thread_informational": round(batch_seconds, digits),
        "data_seconds_informational": round(data_seconds, 1),
        "train_seconds_informational": round(train_seconds, 1),
    }


def weights_payload(
    model: torch.nn.Module,
    network_kwargs: dict[str, Any],
    variables: Iterable[str],
    extra: dict[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """What ``1/weights.pt`` holds (``extra``: the model's own entries, after the variables):
    the serving side rebuilds the network from it and checks the hash."""
    return {
        "state_dict": model.state_dict(),
        "network_kwargs": network_kwargs,
        "variables": list(variables),
        **extra,
        "hyperparameters": metrics["hyperparameters"],
        "state_dict_sha256": metrics["state_dict_sha256"],
        "metrics": {"test": metrics["test"]},
        "synthetic_data_only": True,
    }


def card_fields(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The model-card template fields every model fills the same way from ``metrics.json``:
    its hyperparameters by name, the state-dict hash, the weights' size, the versions, the
    parameter count and the wall-clock minutes."""
    env = metrics["environment"]
    return {
        **metrics["hyperparameters"],
        "state_sha": metrics["state_dict_sha256"],
        "weights_bytes": metrics["weights_bytes"],
        "torch_version": env["torch"],
        "numpy_version": env["numpy"],
        "n_params": metrics["n_parameters"],
        "wall_min": metrics["wall_clock_seconds_informational"] / 60,
    }


def finish(
    metrics: dict[str, Any],
    payload: dict[str, Any],
    shown: dict[str, Any],
    dry_run: bool,
    files: ModelFiles,
    model_card: Callable[[dict[str, Any]], str],
    started: float,
) -> None:
    """Print ``shown`` and the state-dict hash; unless ``dry_run``, save the weights payload,
    add its size, file hash and the total wall-clock time (``started``: ``time.perf_counter()``
    at the start of the run) to ``metrics``, write ``metrics.json`` and the model card rendered
    from it."""
    import torch

    print(json.dumps(shown, indent=1))
    print(f"state dict sha256 {metrics['state_dict_sha256']}; {metrics['n_parameters']} parameters")
    if dry_run:
        return
    torch.save(payload, files.weights)
    metrics["weights_bytes"] = files.weights.stat().st_size
    metrics["weights_file_sha256"] = hashlib.sha256(files.weights.read_bytes()).hexdigest()
    metrics["wall_clock_seconds_informational"] = round(time.perf_counter() - started, 1)
    files.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    files.model_card.write_text(model_card(metrics))
    print(
        f"wrote {files.weights} ({metrics['weights_bytes']} bytes), {files.metrics}, "
        f"{files.model_card}"
    )
    print(f"total {metrics['wall_clock_seconds_informational']} s")
