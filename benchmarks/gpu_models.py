"""Every served model through the real Triton server, in one run: the throughput and latency of
each at batch 1 and at its full batch, with several concurrent clients, on the instance kind the
config selects. On a lent GPU machine ``benchmarks/gpu_serving.sh`` runs it with
``--config-name gpu`` (``KIND_GPU``, configs/gpu.pbtxt) and then with the default CPU config on
the same machine, so the record holds both sides of the same run.

    python -m benchmarks.gpu_models                    # CPU instances (config.pbtxt)
    python -m benchmarks.gpu_models --config-name gpu  # KIND_GPU

Inputs: ``molecule_gnn`` gets real molecules (RDKit's NCI set featurised by the workers'
featuriser, cached in ``.bench/nci_graphs.npz`` so a machine without RDKit replays them); the
fixed-shape models get arrays of their declared shapes (the speed of a CNN, an LSTM or an
autoencoder does not depend on the values) — each answer is checked to be finite and of the
declared batch. The models are the registry's (core/served_models.py), read from the server's
own metadata, so a model added there is measured too.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import median, write_record

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(20261202)
NP_TYPES = {"FP32": np.float32, "INT32": np.int32, "UINT8": np.uint8, "BOOL": np.bool_}


def _ehr_values(variables: tuple[str, ...], shape: list[int]) -> np.ndarray:
    """Values of the model's variables, each within its physiological range (canonical units)."""
    from ingest.ehr.schema import variable

    cols = []
    for name in variables:
        v = variable(name)
        low, high = (0.0, 2.0) if v.flag else (v.low, v.high)
        col = RNG.uniform(low, high, size=shape[:-1])
        cols.append(np.floor(col) if v.flag else col)
    return np.stack(cols, axis=-1).astype(np.float32)


def _fixed_batch(meta: Any, batch: int, variables: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A batch of ``batch`` items of each input's declared shape (no ragged dimension)."""
    out: dict[str, np.ndarray] = {}
    for tensor in meta.inputs:
        shape = [batch, *[int(d) for d in tensor.shape[1:]]]
        if -1 in shape:
            raise ValueError(f"{meta.name}: input {tensor.name} is ragged; give real inputs")
        dtype = NP_TYPES[tensor.datatype]
        if tensor.name == "LENGTH":  # visits per patient: at least one, at most the window
            window = next(int(t.shape[1]) for t in meta.inputs if t.name == "VALUES")
            out[tensor.name] = RNG.integers(1, window + 1, size=shape, dtype=np.int32)
        elif tensor.name == "VALUES" and variables:
            out[tensor.name] = _ehr_values(variables, shape)
        elif tensor.name == "OBSERVED":
            out[tensor.name] = (RNG.random(shape) < 0.8).astype(dtype)
        elif tensor.name == "DT_YEARS":
            out[tensor.name] = np.sort(RNG.random(shape).astype(dtype), axis=-1)
        elif dtype is np.float32:  # in [0, 1): lung-windowed CT, scaled EHR values
            out[tensor.name] = RNG.random(shape).astype(dtype)
        else:
            out[tensor.name] = RNG.integers(0, 2, size=shape).astype(dtype)
    return out


def _molecule_batch(batch: int) -> dict[str, np.ndarray]:
    from benchmarks.triton_serving import DEFAULT_INPUTS, build_inputs, load_graphs
    from workers.chem.graph_arrays import pad_graphs

    if not DEFAULT_INPUTS.is_file():
        build_inputs(DEFAULT_INPUTS)
    graphs = load_graphs(DEFAULT_INPUTS)
    return pad_graphs(graphs[:batch])


class Client:
    """One gRPC client per thread, sending a model's prepared request."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.url = url
        self.local = threading.local()

    def infer(self, model: str, arrays: dict[str, np.ndarray], outputs: list[str]) -> Any:
        from tritonclient.utils import np_to_triton_dtype

        if not hasattr(self.local, "client"):
            self.local.client = self.grpc.InferenceServerClient(self.url)
        inputs = []
        for name, a in arrays.items():
            t = self.grpc.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
            t.set_data_from_numpy(a)
            inputs.append(t)
        wanted = [self.grpc.InferRequestedOutput(o) for o in outputs]
        return self.local.client.infer(model, inputs, outputs=wanted)


def measure(
    client: Client,
    model: str,
    arrays: dict[str, np.ndarray],
    outputs: list[str],
    clients: int,
    seconds: float,
) -> dict[str, Any]:
    """Items/s and per-request latency with ``clients`` threads sending for ``seconds``."""
    items = len(next(iter(arrays.values()))) if "N_ATOMS" not in arrays else len(arrays["N_ATOMS"])
    first = client.infer(model, arrays, outputs)  # warm-up, and the answer's check
    for name in outputs:
        got = first.as_numpy(name)
        if got is None or len(got) != items:
            raise RuntimeError(f"{model}: {name} has {None if got is None else len(got)} rows")
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise RuntimeError(f"{model}: {name} is not finite")
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def run() -> None:
        mine: list[float] = []
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            client.infer(model, arrays, outputs)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "batch": items,
        "clients": clients,
        "requests": len(latencies),
        "items_per_s": len(latencies) * items / wall,
        "latency_ms_p50": median(latencies) * 1e3,
        "latency_ms_p95": latencies[int(0.95 * (len(latencies) - 1))] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-name", default="", help="'gpu' selects configs/gpu.pbtxt")
    parser.add_argument("--seconds", type=float, default=8.0, help="per model and batch size")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()

    import tritonclient.grpc as grpcclient
    from rich.console import Console
    from rich.table import Table

    from core.model_registry import served_models
    from core.settings import Settings
    from medbatch.stack.process import free_port
    from medbatch.stack.triton_server import is_ready, triton_process

    console = Console(width=140)
    seconds = 1.0 if args.quick else args.seconds
    kind = "gpu" if args.config_name == "gpu" else "cpu"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(  # type: ignore[call-arg]
            storage_dir=Path(tmp),
            database_url=f"sqlite:///{tmp}/x.db",
            triton_http_port=free_port(),
            triton_grpc_port=free_port(),
            triton_metrics_port=free_port(),
            triton_model_config_name=args.config_name,
        )
        t_start = time.perf_counter()
        server = triton_process(settings, Path(tmp)).start()
        try:
            server.wait_until(lambda: is_ready(settings), 300, "ready")
            load_s = time.perf_counter() - t_start
            meta_client = grpcclient.InferenceServerClient(settings.triton_grpc_url)
            client = Client(settings.triton_grpc_url)
            for served in served_models(settings):
                meta = meta_client.get_model_metadata(served.name, served.version(settings))
                config = meta_client.get_model_config(served.name, served.version(settings)).config
                groups = [g.kind for g in config.instance_group]
                outputs = [o.name for o in meta.outputs]
                for batch in sorted({1, int(config.max_batch_size) or 1}):
                    ragged = any(-1 in list(t.shape[1:]) for t in meta.inputs)
                    arrays = (
                        _molecule_batch(batch)
                        if ragged
                        else _fixed_batch(meta, batch, served.variables)
                    )
                    row = measure(client, served.name, arrays, outputs, args.clients, seconds)
                    row.update(model=served.name, instance_group=[str(g) for g in groups])
                    rows.append(row)
                    console.log(
                        f"{served.name} batch {batch}: {row['items_per_s']:.0f} items/s, "
                        f"p50 {row['latency_ms_p50']:.1f} ms"
                    )
        finally:
            server.stop()

    table = Table(
        title=f"Every served model through Triton ({kind} config, {args.clients} clients)"
    )
    for col in ("model", "batch", "items/s", "p50 ms", "p95 ms", "requests"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["model"],
            str(r["batch"]),
            f"{r['items_per_s']:.0f}",
            f"{r['latency_ms_p50']:.1f}",
            f"{r['latency_ms_p95']:.1f}",
            str(r["requests"]),
        )
    console.print(table)
    gpu_name = None
    if kind == "gpu":
        import torch

        gpu_name = torch.cuda.get_device_name(0)
    path = write_record(
        f"gpu_models-{kind}",
        {
            "config_name": args.config_name or "default",
            "gpu_name": gpu_name,
            "server_ready_s": load_s,
            "seconds_per_case": seconds,
            "models": rows,
        },
        args.out_dir,
    )
    console.print(f"record: {path}")


if __name__ == "__main__":
    main()
