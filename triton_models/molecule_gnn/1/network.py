"""Graph network of the ``molecule_gnn`` Triton model: aqueous solubility (logS) from the
categorical atom/bond arrays written by ``workers/chem/featurize.py``.

This file runs in two places: inside Triton's python backend (loaded by explicit path from the
model version directory, with no repository on ``sys.path``) and in ``../train.py``. It therefore
imports only torch, torch_geometric, numpy and the standard library; the feature vocabularies are
copied here as constants and a test checks they still equal ``workers.chem.featurize``.

Architecture: per-column embeddings (summed) for atoms and bonds, a stack of GINE convolutions
(bond-aware message passing) with batch norm, ReLU and residual connections, sum + mean pooling
and an MLP head. ``SolubilityEnsemble`` averages several such networks (trained on different
cross-validation folds); its output is the *standardised* target, callers de-standardise with the
mean/std stored in ``weights.pt``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch_geometric.nn import GINEConv, global_add_pool, global_mean_pool

#: Vocabulary size of each atom feature column (``workers.chem.featurize.ATOM_FEATURES``):
#: atomic_num, total_degree, formal_charge, total_num_hs, hybridization, is_aromatic,
#: is_in_ring, chiral_tag.
ATOM_VOCAB: tuple[int, ...] = (120, 7, 7, 5, 8, 2, 2, 4)
#: Vocabulary size of each bond feature column (``workers.chem.featurize.BOND_FEATURES``):
#: bond_type, is_conjugated, is_in_ring, stereo.
BOND_VOCAB: tuple[int, ...] = (5, 2, 2, 6)

Graph = tuple[Tensor, Tensor, Tensor, Tensor, int]
"""A flat graph batch: ``x`` [N, 8] long, ``edge_index`` [2, 2M] long, ``edge_attr`` [2M, 4]
long, ``batch`` [N] long (graph of each atom), ``num_graphs``."""


class CategoricalEncoder(nn.Module):
    """Sum of one embedding per categorical column."""

    def __init__(self, vocab: Sequence[int], dim: int) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(size, dim) for size in vocab)

    def forward(self, feats: Tensor) -> Tensor:
        out = self.embeddings[0](feats[:, 0])
        for col, emb in enumerate(self.embeddings[1:], start=1):
            out = out + emb(feats[:, col])
        return out


class SolubilityGNN(nn.Module):
    """GINE message passing network with bond features; returns one value per graph."""

    def __init__(
        self,
        hidden: int = 128,
        layers: int = 4,
        dropout: float = 0.1,
        head_hidden: int | None = None,
        atom_vocab: Sequence[int] = ATOM_VOCAB,
        bond_vocab: Sequence[int] = BOND_VOCAB,
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.atom_encoder = CategoricalEncoder(atom_vocab, hidden)
        self.bond_encoders = nn.ModuleList(
            CategoricalEncoder(bond_vocab, hidden) for _ in range(layers)
        )
        self.convs = nn.ModuleList(
            GINEConv(
                nn.Sequential(
                    nn.Linear(hidden, hidden),
                    nn.BatchNorm1d(hidden),
                    nn.ReLU(),
                    nn.Linear(hidden, hidden),
                ),
                train_eps=True,
            )
            for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(layers))
        head_hidden = head_hidden or hidden
        self.head = nn.Sequential(
            nn.Linear(2 * hidden, head_hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(head_hidden, 1),
        )

    def forward(
        self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor, num_graphs: int
    ) -> Tensor:
        h = self.atom_encoder(x)
        for conv, norm, bond_encoder in zip(
            self.convs, self.norms, self.bond_encoders, strict=True
        ):
            m = norm(conv(h, edge_index, bond_encoder(edge_attr)))
            m = nn.functional.dropout(torch.relu(m), p=self.dropout, training=self.training)
            h = h + m
        pooled = torch.cat(
            [
                global_add_pool(h, batch, size=num_graphs),
                global_mean_pool(h, batch, size=num_graphs),
            ],
            dim=1,
        )
        return self.head(pooled).squeeze(-1)


class SolubilityEnsemble(nn.Module):
    """Mean of several :class:`SolubilityGNN` members (standardised logS, shape [num_graphs])."""

    def __init__(self, members: int = 1, **hyperparameters) -> None:
        super().__init__()
        self.members = nn.ModuleList(SolubilityGNN(**hyperparameters) for _ in range(members))

    def forward(
        self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor, num_graphs: int
    ) -> Tensor:
        outs = [m(x, edge_index, edge_attr, batch, num_graphs) for m in self.members]
        return torch.stack(outs, dim=0).mean(dim=0)


def _fold_batch_norm(linear: nn.Linear, norm: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
    """(weight [in, out], bias [out]) of ``norm(linear(x))`` in eval mode as one affine map."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    weight = linear.weight.t() * scale[None, :]
    bias = (linear.bias - norm.running_mean) * scale + norm.bias
    return weight, bias


class FusedEnsemble(nn.Module):
    """Inference-only form of a trained :class:`SolubilityEnsemble`: the same function with all
    members evaluated together, for serving.

    Why: on a CPU the ensemble is bound by memory traffic of many small element-wise operations
    (embedding sums, gathers, scatters, batch norms, residuals per member and layer), not by its
    matrix products. Here each member's embedding columns become one lookup (atom columns grouped
    into three joint tables, every bond-feature combination precomputed), every batch norm is
    folded into the linear layer before it, the members run as one batched matrix product over a
    ``[members, rows, hidden]`` tensor, and element-wise steps run in place. Callers should feed it
    sub-batches whose activations stay in cache (:func:`predict_logs` does). Equal to the
    reference to float32 rounding (checked by the tests).
    """

    #: Atom feature columns looked up together (joint tables of the product of their vocabularies).
    ATOM_GROUPS: tuple[tuple[int, ...], ...] = ((0,), (1, 2, 3), (4, 5, 6, 7))

    def __init__(self, ensemble: SolubilityEnsemble) -> None:
        super().__init__()
        members = list(ensemble.members)
        first = members[0]
        self.members = len(members)
        self.hidden = first.atom_encoder.embeddings[0].embedding_dim
        self.layers = len(first.convs)
        atom_vocab = [e.num_embeddings for e in first.atom_encoder.embeddings]
        bond_vocab = [e.num_embeddings for e in first.bond_encoders[0].embeddings]

        # Atom groups: a joint table per group (sum of the group's columns for every combination
        # of their values), stacked per member as [members * rows, hidden].
        group_tables, group_strides, group_bases = [], [], []
        base = 0
        for group in self.ATOM_GROUPS:
            group_tables.append(_stack([_joint_table(m.atom_encoder, group) for m in members]))
            strides = torch.zeros(len(atom_vocab), dtype=torch.long)
            strides[list(group)] = _mixed_radix([atom_vocab[c] for c in group])[0]
            group_strides.append(strides)
            group_bases.append(base)
            base += group_tables[-1].shape[1]
        self.atom_rows = base
        self.register_buffer(
            "atom_table", torch.cat(group_tables, 1).reshape(-1, self.hidden).contiguous()
        )
        self.register_buffer("atom_strides", torch.stack(group_strides))  # [groups, columns]
        self.register_buffer("atom_bases", torch.tensor(group_bases))
        self.bond_rows = math.prod(bond_vocab)
        self.register_buffer("bond_strides", _mixed_radix(bond_vocab)[0])
        bond_columns = tuple(range(len(bond_vocab)))
        for layer in range(self.layers):
            table = _stack([_joint_table(m.bond_encoders[layer], bond_columns) for m in members])
            self.register_buffer(f"bond_table{layer}", table.reshape(-1, self.hidden))
            eps, w1, b1, w2, b2 = [], [], [], [], []
            for m in members:
                conv, norm = m.convs[layer], m.norms[layer]
                lin1, bn1, _, lin2 = conv.nn
                weight, bias = _fold_batch_norm(lin1, bn1)
                w1.append(weight)
                b1.append(bias[None, :])
                weight, bias = _fold_batch_norm(lin2, norm)
                w2.append(weight)
                b2.append(bias[None, :])
                eps.append((1.0 + conv.eps).reshape(1, 1))
            self.register_buffer(f"eps{layer}", _stack(eps))
            self.register_buffer(f"w1_{layer}", _stack(w1))
            self.register_buffer(f"b1_{layer}", _stack(b1))
            self.register_buffer(f"w2_{layer}", _stack(w2))
            self.register_buffer(f"b2_{layer}", _stack(b2))
        self.register_buffer("wh1", _stack([m.head[0].weight.t() for m in members]))
        self.register_buffer("bh1", _stack([m.head[0].bias[None, :] for m in members]))
        self.register_buffer("wh2", _stack([m.head[3].weight.t() for m in members]))
        self.register_buffer("bh2", _stack([m.head[3].bias[None, :] for m in members]))
        self.register_buffer("member_ids", torch.arange(self.members)[:, None, None])

    def forward(
        self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor, num_graphs: int
    ) -> Tensor:
        return self.member_outputs(x, edge_index, edge_attr, batch, num_graphs).mean(dim=0)

    def member_outputs(
        self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor, num_graphs: int
    ) -> Tensor:
        """Each member's standardised logS, shape [members, num_graphs] (their spread is the
        served uncertainty)."""
        k, hidden = self.members, self.hidden
        # Atoms: three joint-table rows per atom and member, summed by one embedding_bag.
        codes = (x[:, None, :] * self.atom_strides[None]).sum(-1) + self.atom_bases  # [N, groups]
        rows = codes[None] + self.member_ids * self.atom_rows  # [K, N, groups]
        h = nn.functional.embedding_bag(
            rows.reshape(-1, rows.shape[-1]), self.atom_table, mode="sum"
        ).view(k, -1, hidden)
        bond_rows = (edge_attr * self.bond_strides).sum(-1)[None] + self.member_ids[:, :, 0] * (
            self.bond_rows
        )  # [K, E]
        src, dst = edge_index[0], edge_index[1]
        for layer in range(self.layers):
            messages = h.index_select(1, src)
            messages += nn.functional.embedding(bond_rows, getattr(self, f"bond_table{layer}"))
            messages.relu_()
            z = (h * getattr(self, f"eps{layer}")).index_add_(1, dst, messages)
            z = torch.baddbmm(getattr(self, f"b1_{layer}"), z, getattr(self, f"w1_{layer}")).relu_()
            m = torch.baddbmm(getattr(self, f"b2_{layer}"), z, getattr(self, f"w2_{layer}")).relu_()
            h = h + m
        total = h.new_zeros(k, num_graphs, hidden).index_add_(1, batch, h)
        counts = torch.bincount(batch, minlength=num_graphs).clamp(min=1).to(h.dtype)
        pooled = torch.cat([total, total / counts[None, :, None]], dim=2)
        out = torch.baddbmm(self.bh1, pooled, self.wh1).relu_()
        return torch.baddbmm(self.bh2, out, self.wh2).squeeze(-1)


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    """Per-member parameters stacked on a new leading axis, detached and contiguous."""
    return torch.stack([t.detach() for t in tensors]).contiguous()


def _mixed_radix(vocab: Sequence[int]) -> Tensor:
    """Strides [1, columns] that turn a row of codes into one index of their joint table."""
    strides = [1] * len(vocab)
    for i in range(len(vocab) - 2, -1, -1):
        strides[i] = strides[i + 1] * vocab[i + 1]
    return torch.tensor(strides)[None, :]


def _joint_table(encoder: CategoricalEncoder, columns: tuple[int, ...]) -> Tensor:
    """[product of vocabularies, hidden]: the summed embeddings of ``columns`` for every
    combination of their values, rows in the order of :func:`_mixed_radix`."""
    table = None
    for col in columns:
        weight = encoder.embeddings[col].weight.detach()
        table = (
            weight
            if table is None
            else (table[:, None, :] + weight[None, :, :]).reshape(-1, weight.shape[1])
        )
    assert table is not None
    return table


def build_from_payload(payload: dict) -> SolubilityEnsemble:
    """The ensemble stored in a ``weights.pt`` payload (see ``../train.py``), in eval mode."""
    if tuple(payload["atom_vocab"]) != ATOM_VOCAB or tuple(payload["bond_vocab"]) != BOND_VOCAB:
        raise ValueError(
            "weights.pt was trained with other feature vocabularies than network.py declares; "
            "retrain with triton_models/molecule_gnn/train.py"
        )
    model = SolubilityEnsemble(members=payload["members"], **payload["network_kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def validate_padded(
    atom_feats: Tensor, n_atoms: Tensor, bond_index: Tensor, bond_feats: Tensor, n_bonds: Tensor
) -> str | None:
    """Why a padded chunk is malformed, or ``None`` if :func:`padded_to_batch` may take it.

    Checks shapes, counts within the padded sizes, bond endpoints inside their molecule and
    feature values inside their vocabularies (an embedding lookup out of range would otherwise
    fail the whole forward pass).
    """
    if atom_feats.dim() != 3 or atom_feats.shape[2] != len(ATOM_VOCAB):
        return f"ATOM_FEATS must have shape [B, A, {len(ATOM_VOCAB)}], got {list(atom_feats.shape)}"
    if bond_feats.dim() != 3 or bond_feats.shape[2] != len(BOND_VOCAB):
        return f"BOND_FEATS must have shape [B, E, {len(BOND_VOCAB)}], got {list(bond_feats.shape)}"
    if bond_index.dim() != 3 or bond_index.shape[2] != 2:
        return f"BOND_INDEX must have shape [B, E, 2], got {list(bond_index.shape)}"
    b, a = atom_feats.shape[0], atom_feats.shape[1]
    e = bond_index.shape[1]
    if tuple(bond_feats.shape[:2]) != (b, e):
        return (
            f"BOND_FEATS shape {list(bond_feats.shape)} does not match "
            f"BOND_INDEX shape {list(bond_index.shape)}"
        )
    for name, counts in (("N_ATOMS", n_atoms), ("N_BONDS", n_bonds)):
        if counts.numel() != b:
            return f"{name} must have shape [B, 1] with B={b}, got {list(counts.shape)}"
    na = n_atoms.reshape(-1).long()
    nb = n_bonds.reshape(-1).long()
    if bool((na < 0).any()) or bool((na > a).any()):
        i = int(((na < 0) | (na > a)).nonzero()[0])
        return f"N_ATOMS[{i}]={int(na[i])} outside [0, A={a}] (padded atom axis)"
    if bool((nb < 0).any()) or bool((nb > e).any()):
        i = int(((nb < 0) | (nb > e)).nonzero()[0])
        return f"N_BONDS[{i}]={int(nb[i])} outside [0, E={e}] (padded bond axis)"
    bond_mask = torch.arange(e, device=nb.device)[None, :] < nb[:, None]
    bi = bond_index.long()
    bad = bond_mask[:, :, None] & ((bi < 0) | (bi >= na[:, None, None]))
    if bool(bad.any()):
        mol, bond, _ = (int(v) for v in bad.nonzero()[0])
        return (
            f"BOND_INDEX[{mol}, {bond}]={bi[mol, bond].tolist()} out of range for a molecule "
            f"of N_ATOMS={int(na[mol])}"
        )
    atom_mask = torch.arange(a, device=na.device)[None, :] < na[:, None]
    for feats, mask, vocab, name in (
        (atom_feats, atom_mask, ATOM_VOCAB, "ATOM_FEATS"),
        (bond_feats, bond_mask, BOND_VOCAB, "BOND_FEATS"),
    ):
        limit = torch.tensor(vocab, device=feats.device)
        bad = mask[:, :, None] & (feats.long() >= limit)
        if bool(bad.any()):
            mol, row, col = (int(v) for v in bad.nonzero()[0])
            return (
                f"{name}[{mol}, {row}, {col}]={int(feats[mol, row, col])} outside the "
                f"vocabulary of column {col} (size {vocab[col]})"
            )
    return None


def padded_to_batch(
    atom_feats: Tensor, n_atoms: Tensor, bond_index: Tensor, bond_feats: Tensor, n_bonds: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Padded chunk arrays → flat PyG graph ``(x, edge_index, edge_attr, batch)``.

    Shapes in: ``[B, A, 8]`` uint8, ``[B, 1]`` int32, ``[B, E, 2]`` int32, ``[B, E, 4]`` uint8,
    ``[B, 1]`` int32. Out: ``x`` [N, 8] long, ``edge_index`` [2, 2M] long with both directions
    (all forward edges first, then all reversed ones), ``edge_attr`` [2M, 4] long, ``batch`` [N]
    long. Padding rows are dropped; bond endpoints are offset by the atoms of the preceding
    molecules. Vectorised; no loop per molecule. Inputs are assumed valid (see
    :func:`validate_padded`).
    """
    b, a = atom_feats.shape[0], atom_feats.shape[1]
    e = bond_index.shape[1]
    device = atom_feats.device
    na = n_atoms.reshape(-1).long()
    nb = n_bonds.reshape(-1).long()
    atom_mask = torch.arange(a, device=device)[None, :] < na[:, None]
    bond_mask = torch.arange(e, device=device)[None, :] < nb[:, None]
    x = atom_feats[atom_mask].long()
    batch = torch.repeat_interleave(torch.arange(b, device=device), na)
    offsets = torch.cumsum(na, 0) - na
    ends = (bond_index.long() + offsets[:, None, None])[bond_mask]  # [M, 2]
    edge_index = torch.cat([ends.t(), ends.flip(1).t()], dim=1)
    attr = bond_feats[bond_mask].long()
    edge_attr = torch.cat([attr, attr], dim=0)
    return x, edge_index, edge_attr, batch


def concat_graphs(graphs: Sequence[Graph]) -> Graph:
    """Concatenate flat graph batches into one (offsetting atom indices and graph ids)."""
    xs, eis, eas, batches = [], [], [], []
    atom_offset = graph_offset = 0
    for x, edge_index, edge_attr, batch, num_graphs in graphs:
        xs.append(x)
        eis.append(edge_index + atom_offset)
        eas.append(edge_attr)
        batches.append(batch + graph_offset)
        atom_offset += x.shape[0]
        graph_offset += num_graphs
    return (
        torch.cat(xs, 0),
        torch.cat(eis, 1),
        torch.cat(eas, 0),
        torch.cat(batches, 0),
        graph_offset,
    )


#: Molecules per forward pass on a CPU: ~64 drug-like molecules keep the fused ensemble's
#: activations (members × atoms × hidden floats) in cache; a chunk of 1,024 at once runs 2.5×
#: slower per molecule on the same core (measured on the NCI set, one torch thread).
CPU_SUB_BATCH = 64


def build_for_serving(payload: dict) -> FusedEnsemble:
    """The served form of a ``weights.pt`` payload: :class:`FusedEnsemble`, in eval mode."""
    return FusedEnsemble(build_from_payload(payload)).eval()


def split_graph(graph: Graph, max_graphs: int) -> list[Graph]:
    """Consecutive pieces of a flat graph batch holding at most ``max_graphs`` molecules each.

    Atoms of a molecule are contiguous and in molecule order (``padded_to_batch`` and
    ``concat_graphs`` build them so); edges are regrouped by the molecule of their source atom.
    """
    x, edge_index, edge_attr, batch, num_graphs = graph
    if num_graphs <= max_graphs:
        return [graph]
    edge_graph = batch[edge_index[0]]
    order = torch.argsort(edge_graph, stable=True)
    edge_index, edge_attr, edge_graph = edge_index[:, order], edge_attr[order], edge_graph[order]
    bounds = torch.arange(0, num_graphs + max_graphs, max_graphs).clamp(max=num_graphs)
    atom_cuts = torch.searchsorted(batch, bounds).tolist()
    edge_cuts = torch.searchsorted(edge_graph, bounds).tolist()
    pieces = []
    for i in range(len(atom_cuts) - 1):
        a0, a1, e0, e1 = atom_cuts[i], atom_cuts[i + 1], edge_cuts[i], edge_cuts[i + 1]
        g0, g1 = int(bounds[i]), int(bounds[i + 1])
        pieces.append(
            (x[a0:a1], edge_index[:, e0:e1] - a0, edge_attr[e0:e1], batch[a0:a1] - g0, g1 - g0)
        )
    return pieces


def predict_members(
    model: FusedEnsemble, graph: Graph, device: torch.device, mean: float, std: float
) -> Tensor:
    """Each member's logS (log10 mol/L) for each molecule of one flat graph batch, on the CPU,
    shape [members, num_graphs]: the serving path in one place, for Triton's model.py and its
    benchmark. On a CPU the batch runs in pieces of :data:`CPU_SUB_BATCH` molecules; a GPU takes
    it whole."""
    pieces = [graph] if device.type != "cpu" else split_graph(graph, CPU_SUB_BATCH)
    outs = []
    with torch.inference_mode():
        for x, edge_index, edge_attr, batch, num_graphs in pieces:
            pred = model.member_outputs(
                x.to(device),
                edge_index.to(device),
                edge_attr.to(device),
                batch.to(device),
                num_graphs,
            )
            outs.append(pred.float() * std + mean)
    return torch.cat(outs, dim=1).cpu()


def predict_logs(
    model: FusedEnsemble, graph: Graph, device: torch.device, mean: float, std: float
) -> Tensor:
    """logS of each molecule of one flat graph batch (the members' mean), shape [num_graphs]."""
    return predict_members(model, graph, device, mean, std).mean(dim=0)


def predict_logs_and_spread(
    model: FusedEnsemble, graph: Graph, device: torch.device, mean: float, std: float
) -> tuple[Tensor, Tensor]:
    """The served outputs of one flat graph batch, each of shape [num_graphs]: logS (the
    members' mean) and its spread (standard deviation over the members, ``ddof=0``)."""
    members = predict_members(model, graph, device, mean, std)
    return members.mean(dim=0), members.std(dim=0, correction=0)


def atom_contributions(model: SolubilityEnsemble, graph: Graph, std: float) -> Tensor:
    """Each atom's contribution to logS (log units), shape [atoms of the batch]: gradient × input
    on the atom's embedding (summed over hidden units), averaged over the members.

    Why on the trained :class:`SolubilityEnsemble` and not the fused one: it needs autograd,
    which the fused network's in-place steps exclude; explanations are asked for a few molecules
    at a time, so its speed does not matter. Positive: the atom raises the predicted solubility.
    """
    x, edge_index, edge_attr, batch, num_graphs = graph
    embedded: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: Tensor) -> None:
        output.retain_grad()
        embedded.append(output)

    handles = [m.atom_encoder.register_forward_hook(keep) for m in model.members]
    try:
        with torch.enable_grad():
            model(x, edge_index, edge_attr, batch, num_graphs).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    # d(mean)/dh_k = (1/K) df_k/dh_k, so the sum over members is the members' mean.
    total = torch.stack([(h * h.grad).sum(-1) for h in embedded if h.grad is not None]).sum(0)
    return total.detach() * std


def pad_per_molecule(values: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Per-atom values of a flat batch as [num_graphs, most atoms in a molecule], each
    molecule's atoms in order from column 0, zero after its last atom."""
    counts = torch.bincount(batch, minlength=num_graphs)
    width = int(counts.max()) if counts.numel() else 0
    offsets = torch.cumsum(counts, 0) - counts
    position = torch.arange(batch.shape[0], device=batch.device) - offsets[batch]
    out = values.new_zeros(num_graphs, max(width, 1))
    out[batch, position] = values
    return out
