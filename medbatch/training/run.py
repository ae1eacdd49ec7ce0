"""The deterministic training run shared by the EHR reference models' ``train.py`` scripts:
seeding, the minibatch loop (AdamW, one-cycle schedule, fixed shuffled order, clipped
gradients, a progress bar), timing and writing ``weights.pt`` / ``metrics.json`` / the model
card. One copy, so that both models are rebuilt bit for bit the same way: fixed seeds,
deterministic algorithms, one torch thread and a fixed data order give bit-identical weights on
every rerun, and ``metrics.json`` records the SHA-256 of the state dict tensors. torch, rich and
scikit-learn are imported inside the functions (training-only dependencies)."""

from __future__ import annotations

import hashlib
import json
import platform
import random
import time
from argparse import ArgumentParser
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch


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


#: One minibatch: (indices, the loop's generator) → (loss to minimise, named floats to average).
Step = Callable[["torch.Tensor", "torch.Generator"], tuple["torch.Tensor", dict[str, float]]]
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
) -> list[dict[str, Any]]:
    """AdamW with a one-cycle schedule over ``n`` training rows, minibatches in an order drawn
    from a generator seeded with ``seed`` (which ``step`` also draws from), gradient norm
    clipped at 1; returns the history entries of ``end_epoch``. The model is left in eval
    mode."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(seed)
    history = []
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("training", total=args.epochs * steps_per_epoch, info="")
        for epoch in range(args.epochs):
            model.train()
            perm = torch.randperm(n, generator=gen)
            sums: dict[str, float] = {}
            for s in range(steps_per_epoch):
                idx = perm[s * args.batch_size : (s + 1) * args.batch_size]
                loss, parts = step(idx, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + value
                progress.advance(task)
            model.eval()
            entry, info = end_epoch(epoch, {k: v / steps_per_epoch for k, v in sums.items()})
            history.append(entry)
            progress.update(task, info=info)
    model.eval()
    return history


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


def environment() -> dict[str, str]:
    """The versions a ``metrics.json`` records next to the state-dict hash."""
    import sklearn
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
    }


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's training script writes: ``1/weights.pt``, ``metrics.json`` and
    ``MODEL_CARD.md`` in the model directory ``here``."""

    here: Path

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


def base_parser(doc: str | None, *, train: int, val: int, test: int, epochs: int) -> ArgumentParser:
    """The options every training script takes (split sizes, the loop's settings,
    ``--dry-run``), with the script's defaults; the script adds its model's options."""
    parser = ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--train", type=int, default=train, help="training patients")
    parser.add_argument("--val", type=int, default=val, help="validation patients")
    parser.add_argument("--test", type=int, default=test, help="test patients")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--dry-run", action="store_true", help="train and report, write nothing")
    return parser


def model_record(
    model: torch.nn.Module,
    network: Any,
    normalisation: dict[str, Any],
    history: list[dict[str, Any]],
    hyperparameters: dict[str, Any],
) -> dict[str, Any]:
    """The trained model's part of ``metrics.json``, in its order: normalisation, history,
    hyperparameters, parameter count and ``network.state_dict_sha256``."""
    return {
        "normalisation": normalisation,
        "history": history,
        "hyperparameters": hyperparameters,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "state_dict_sha256": network.state_dict_sha256(model.state_dict()),
    }


def timings(
    batch_seconds: float, digits: int, data_seconds: float, train_seconds: float
) -> dict[str, float]:
    """The informational timing fields of ``metrics.json`` (they differ between reruns)."""
    return {
        "cpu_seconds_per_64_patients_1_thread_informational": round(batch_seconds, digits),
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


def load_network_module(name: str, version_dir: Path) -> Any:
    """``<version_dir>/network.py`` loaded by path, exactly as the Triton model does (a model
    directory is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_network", version_dir / "network.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
