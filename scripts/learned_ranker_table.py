"""Build the training table of the learned transferability ranker from the stored zoo benchmarks.

Reads ``benchmarks/results/rank_zoo*.json`` (written by ``benchmarks/rank_zoo.py``) and writes
``src/transferkit/rank/zoo_results.json``: one record per (result file, zoo, target) with every
candidate's per-model metric scores and set-level ranker scores (the derived ``auto`` rows are left
out), the measured fine-tuning and linear-probe accuracies, and, per source file, its sha256 and the
command that produced it. The package reads only this table, never ``benchmarks/``.

    .venv/bin/python scripts/learned_ranker_table.py            # rewrite the table
    .venv/bin/python scripts/learned_ranker_table.py --check    # exit 1 if the table is out of date
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# re-measures of a setting that is already a source: the same targets and protocol would count twice
REMEASURES = {"rank_zoo_image500.json": "rank_zoo_image60_lr4's command again (1 torch thread), with bootstrap intervals"}
SOURCES = sorted(p for p in (ROOT / "benchmarks" / "results").glob("rank_zoo*.json") if p.name not in REMEASURES)
OUT = ROOT / "src" / "transferkit" / "rank" / "zoo_results.json"
DERIVED = ("auto", "auto_consensus")  # rank aggregations of the other rows, not metrics
VERSION = 1


def build() -> dict:
    records, sources, metrics = [], [], []
    for path in SOURCES:
        doc = json.loads(path.read_text())
        sources.append({"file": path.relative_to(ROOT).as_posix(), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "command": doc["command"]})
        for zoo, z in doc["zoos"].items():
            for r in z["targets"]:
                scores = {k: dict(sorted(v.items())) for k, v in sorted(r["scores"].items()) if k not in DERIVED and v}
                metrics += [k for k in scores if k not in metrics]
                records.append({"source": path.name, "zoo": zoo, "target": r["target"], "n_train": r["n_train"],
                                "n_test": r["n_test"], "models": list(z["models"]), "scores": scores,
                                "finetune": r["ground_truth"]["finetune"], "linear": r["ground_truth"]["linear"]})
    return {"version": VERSION, "generated_by": "python scripts/learned_ranker_table.py", "sources": sources,
            "metrics": sorted(metrics), "records": records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the stored table differs from a rebuilt one")
    args = ap.parse_args()
    text = json.dumps(build(), indent=1, sort_keys=True) + "\n"
    if args.check:
        same = OUT.is_file() and OUT.read_text() == text
        print(f"{OUT.relative_to(ROOT)}: {'up to date' if same else 'OUT OF DATE'}")
        sys.exit(0 if same else 1)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text) // 1024} KiB)")


if __name__ == "__main__":
    main()
