"""What the applicability domain and the interval cost a chunk, against the featurisation the
worker already does for the same chunk (issue 15, item 6).

    python -m benchmarks.chem_domain            # from the repository root; --quick: a smoke run

Both sides run in this process on the same canonical SMILES (RDKit's NCI set, 4,991 that parse,
in chunks of the worker's default size), alternating, several repetitions: the featuriser
(``workers.chem.featurize.featurize_smiles``, parse + arrays) and the domain step
(``workers.chem.domain.Applicability.assess``, parse + Morgan fingerprint + RDKit's bulk
Tanimoto over the 1,025 training molecules + elements, size, fragments + the interval). The
ratio is the domain step's share of the per-molecule CPU the worker spends before Triton.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rdkit import Chem, RDConfig, RDLogger

from benchmarks.common import alternate, median, timed, write_record
from core.served_models import MOLECULE_GNN
from core.settings import Settings
from workers.chem.domain import applicability_for
from workers.chem.featurize import featurize_smiles


def nci_smiles() -> list[str]:
    RDLogger.DisableLog("rdApp.*")
    path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    out = []
    for line in path.read_text().splitlines():
        mol = Chem.MolFromSmiles(line.split()[0]) if line.strip() else None
        if mol is not None:
            out.append(Chem.MolToSmiles(mol))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 molecules, 2 repetitions")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    settings = Settings()
    smiles = nci_smiles()
    reps = args.reps
    if args.quick:
        smiles, reps = smiles[:500], 2
    chunk = settings.chem_chunk_size
    chunks = [smiles[i : i + chunk] for i in range(0, len(smiles), chunk)]
    app = applicability_for(MOLECULE_GNN, "1", settings)
    assert app is not None
    values = {c[0]: ([-3.0] * len(c), [0.3] * len(c)) for c in chunks}

    def featurise() -> float:
        return timed(lambda: [featurize_smiles(c) for c in chunks])

    def domain() -> float:
        return timed(lambda: [app.assess(c, *values[c[0]]) for c in chunks])

    domain()  # warm-up: fingerprints of the training set, caches
    runs = alternate({"featurize": featurise, "domain": domain}, reps)
    per_mol = {k: median(v) / len(smiles) * 1e6 for k, v in runs.items()}
    ratio = per_mol["domain"] / per_mol["featurize"]
    out_of_domain = sum(1 for c in chunks for row in app.assess(c, *values[c[0]]) if not row[2])
    record = {
        "molecules": len(smiles),
        "chunk_size": chunk,
        "reps": reps,
        "seconds": runs,
        "us_per_molecule": {k: round(v, 1) for k, v in per_mol.items()},
        "domain_over_featurize": round(ratio, 3),
        "out_of_domain_fraction": round(out_of_domain / len(smiles), 4),
    }
    path = write_record("chem_domain", record, args.out_dir)
    print(f"featurize {per_mol['featurize']:.1f} µs/molecule, domain {per_mol['domain']:.1f}")
    print(f"domain / featurize = {ratio:.2f}; out of domain {out_of_domain}/{len(smiles)}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
