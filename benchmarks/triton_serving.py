"""Workload 4, Triton serving: ``molecule_gnn`` through the real Triton server against the same
network and weights called in-process with torch, on the same molecules, alternating.

    python -m benchmarks.triton_serving                    # CPU instance (config.pbtxt)
    python -m benchmarks.triton_serving --config-name gpu  # KIND_GPU (configs/gpu.pbtxt)

Reports molecules/s at batch 1, 64 and 512 for both sides and their ratio (Triton's overhead),
and the throughput of dynamic batching (many clients sending one molecule each) against one
client sending one molecule at a time. Inputs are real molecules: RDKit's NCI set, featurised
once by the workers' featuriser and cached as arrays (so a machine without RDKit can replay them).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import alternate, median, write_record
from workers.chem.graph_arrays import MolGraph, pad_graphs

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "triton_models" / "molecule_gnn" / "1"
DEFAULT_INPUTS = REPO / ".bench" / "nci_graphs.npz"
INPUT_NAMES = ("ATOM_FEATS", "N_ATOMS", "BOND_INDEX", "BOND_FEATS", "N_BONDS")


# --- inputs ----------------------------------------------------------------------------------
def build_inputs(path: Path) -> None:
    """Featurise RDKit's NCI molecules with the workers' featuriser; store them flat."""
    from rdkit import Chem

    from tests.conftest import RDKIT_NCI
    from workers.chem.featurize import mol_to_graph

    graphs = []
    for line in RDKIT_NCI.read_text().splitlines():
        mol = Chem.MolFromSmiles(line.split("\t")[0])
        if mol is not None and mol.GetNumAtoms():
            graphs.append(mol_to_graph(mol))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        atoms=np.concatenate([g.atoms for g in graphs]),
        bond_index=np.concatenate([g.bond_index for g in graphs]),
        bonds=np.concatenate([g.bonds for g in graphs]),
        n_atoms=np.array([len(g.atoms) for g in graphs]),
        n_bonds=np.array([len(g.bonds) for g in graphs]),
    )


def load_graphs(path: Path) -> list[MolGraph]:
    data = np.load(path)
    a_off = np.concatenate([[0], np.cumsum(data["n_atoms"])])
    b_off = np.concatenate([[0], np.cumsum(data["n_bonds"])])
    return [
        MolGraph(
            data["atoms"][a_off[i] : a_off[i + 1]],
            data["bond_index"][b_off[i] : b_off[i + 1]],
            data["bonds"][b_off[i] : b_off[i + 1]],
        )
        for i in range(len(data["n_atoms"]))
    ]


def chunks(graphs: list[MolGraph], size: int, count: int) -> list[dict[str, np.ndarray]]:
    out, start = [], 0
    for _ in range(count):
        members = [graphs[(start + i) % len(graphs)] for i in range(size)]
        start += size
        out.append(pad_graphs(members))
    return out


# --- the two sides ---------------------------------------------------------------------------
class InProcess:
    """The same network.py and weights.pt Triton serves, called directly with torch."""

    def __init__(self, device: str) -> None:
        import torch

        from triton_torch_adapter.model_files import load_network, load_weights

        self.net = load_network(MODEL_DIR)
        payload = load_weights(MODEL_DIR)
        self.torch = torch
        self.device = torch.device(device)
        self.model = self.net.build_for_serving(payload).to(self.device).eval()
        self.mean, self.std = float(payload["target_mean"]), float(payload["target_std"])

    def __call__(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        tensors = [torch.from_numpy(arrays[n]) for n in INPUT_NAMES]
        graph = (*self.net.padded_to_batch(*tensors), int(tensors[0].shape[0]))
        return self.net.predict_logs(self.model, graph, self.device, self.mean, self.std).numpy()


class TritonSide:
    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.url = url
        self.local = threading.local()

    def client(self) -> Any:
        if not hasattr(self.local, "client"):
            self.local.client = self.grpc.InferenceServerClient(self.url)
        return self.local.client

    def __call__(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name in INPUT_NAMES:
            t = self.grpc.InferInput(
                name, list(arrays[name].shape), np_to_triton_dtype(arrays[name].dtype)
            )
            t.set_data_from_numpy(arrays[name])
            inputs.append(t)
        result = self.client().infer("molecule_gnn", inputs, model_version="1")
        return result.as_numpy("LOGS")


def concurrent_throughput(
    side: TritonSide, requests: list[dict[str, np.ndarray]], clients: int
) -> float:
    """Molecules/s with ``clients`` threads each sending its share of batch-1 requests."""
    shares = [requests[i::clients] for i in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def run(share: list[dict[str, np.ndarray]]) -> None:
        side.client()
        barrier.wait()
        for arrays in share:
            side(arrays)

    threads = [threading.Thread(target=run, args=(s,)) for s in shares]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return len(requests) / (time.perf_counter() - t0)


# --- the run ---------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-name", default="", help="'gpu' selects configs/gpu.pbtxt (KIND_GPU)"
    )
    parser.add_argument("--inputs", type=Path, default=DEFAULT_INPUTS)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from core.settings import Settings
    from medbatch.stack.process import free_port
    from medbatch.stack.triton_server import is_ready, triton_process

    console = Console()
    if not args.inputs.is_file():
        console.print(f"featurising RDKit's NCI set into {args.inputs} …")
        build_inputs(args.inputs)
    graphs = load_graphs(args.inputs)
    device = "cuda:0" if args.config_name == "gpu" else "cpu"
    reps = 2 if args.quick else args.reps
    plan = {1: 60, 64: 8, 512: 2} if args.quick else {1: 400, 64: 40, 512: 8}

    import torch

    if device == "cpu":
        torch.set_num_threads(1)  # the CPU instance runs with cpu_threads=1 too
    inproc = InProcess(device)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            storage_dir=Path(tmp),
            database_url=f"sqlite:///{tmp}/x.db",
            triton_http_port=free_port(),
            triton_grpc_port=free_port(),
            triton_metrics_port=free_port(),
            triton_model_config_name=args.config_name,
        )
        server = triton_process(settings, Path(tmp)).start()
        try:
            server.wait_until(lambda: is_ready(settings), 240, "ready")
            triton = TritonSide(settings.triton_grpc_url)
            probe = chunks(graphs, 64, 1)[0]
            max_diff = float(np.abs(triton(probe).ravel() - inproc(probe).ravel()).max())
            rows: list[dict[str, Any]] = []
            for size, count in plan.items():
                work = chunks(graphs, size, count)
                for arrays in work[:3]:  # warm both sides
                    triton(arrays)
                    inproc(arrays)
                times = alternate(
                    {
                        "triton": lambda w=work: _run_all(triton, w),
                        "in_process": lambda w=work: _run_all(inproc, w),
                    },
                    reps,
                )
                mols = size * count
                t_med, i_med = median(times["triton"]), median(times["in_process"])
                rows.append(
                    {
                        "batch": size,
                        "molecules": mols,
                        "triton_mol_s": mols / t_med,
                        "in_process_mol_s": mols / i_med,
                        "overhead_ratio": t_med / i_med,
                        "reps": reps,
                    }
                )
            single = chunks(graphs, 1, plan[1] * 2)
            seq = [_run_rate(triton, single) for _ in range(reps)]
            conc = [concurrent_throughput(triton, single, args.clients) for _ in range(reps)]
            dyn = {
                "clients": args.clients,
                "sequential_batch1_mol_s": median(seq),
                "dynamic_batching_mol_s": median(conc),
                "speedup": median(conc) / median(seq),
            }
        finally:
            server.stop()

    table = Table(title=f"molecule_gnn: Triton vs in-process torch ({device})")
    for col in ("batch", "Triton mol/s", "in-process mol/s", "Triton time / in-process"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["batch"]),
            f"{r['triton_mol_s']:.0f}",
            f"{r['in_process_mol_s']:.0f}",
            f"{r['overhead_ratio']:.2f}×",
        )
    console.print(table)
    console.print(
        f"dynamic batching, {dyn['clients']} clients × batch 1: "
        f"{dyn['dynamic_batching_mol_s']:.0f} mol/s "
        f"vs one client {dyn['sequential_batch1_mol_s']:.0f} mol/s → {dyn['speedup']:.2f}×"
    )
    console.print(f"max |Triton − in-process| on 64 molecules: {max_diff:.2e}")
    path = write_record(
        f"triton_serving-{'gpu' if device != 'cpu' else 'cpu'}",
        {
            "device": device,
            "torch": torch.__version__,
            "gpu_name": torch.cuda.get_device_name(0) if device != "cpu" else None,
            "batches": rows,
            "dynamic_batching": dyn,
            "max_abs_diff": max_diff,
            "targets": {"overhead_at_64": "<= 1.2", "dynamic_batching_speedup": ">= 3"},
        },
        args.out_dir,
    )
    console.print(f"record: {path}")


def _run_all(side: Any, work: list[dict[str, np.ndarray]]) -> float:
    t0 = time.perf_counter()
    for arrays in work:
        side(arrays)
    return time.perf_counter() - t0


def _run_rate(side: Any, work: list[dict[str, np.ndarray]]) -> float:
    return len(work) / _run_all(side, work)


if __name__ == "__main__":
    main()
