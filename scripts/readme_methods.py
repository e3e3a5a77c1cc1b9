"""Write the README's method tables from the method registry (and check them in CI).

    python scripts/readme_methods.py           # rewrite the tables between the markers in README.md
    python scripts/readme_methods.py --check   # exit 1 when README.md differs from what the registry gives

One row per registered method: paper → module → CLI → measured result. The results live in
``docs/method_results.yaml`` (one line per method, from the benchmarks); a registered method without
one is shown as "not measured" rather than left out.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "method_results.yaml"
# stage → how its methods are chosen on the command line
CLI = {"rank": "transferkit rank --metrics {name}", "tune": "transferkit tune --method {name}",
       "merge": "transferkit merge --method {name}", "adapt": "transferkit adapt --method {name}",
       "distill": "transferkit distill --method {name}"}
# methods of a kind that is not chosen with --method (label-free scorers select an adapted model)
CLI_BY_KIND = {("adapt", "scorer"): "Python: engine.train(metric=adapt.scorers.make_scorer('{name}', …))",
               ("adapt", "zero-shot"): "Python: adapt.zeroshot.zero_shot(seen_X, seen_y, target_X, seen_classes, "
                                       "unseen_classes)"}


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def table(stage: str, results: dict[str, str]) -> str:
    from transferkit import registry

    rows = ["| method | paper | module | CLI | result |", "|---|---|---|---|---|"]
    for name, m in registry.methods(stage).items():
        module = m.module.replace("transferkit.", "").replace(".", "/") + ".py"
        cli = CLI_BY_KIND.get((stage, m.info.get("kind")), CLI[stage]).format(name=name)
        rows.append(f"| `{name}` | {_cell(m.paper)} | `{module}` | `{cli}` | "
                    f"{_cell(results.get(name, 'not measured'))} |")
    return "\n".join(rows)


def render(text: str) -> str:
    results = yaml.safe_load(RESULTS.read_text())
    for stage in CLI:
        start, end = f"<!-- methods:{stage}:start -->", f"<!-- methods:{stage}:end -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no {start} … {end} block")
        text = pattern.sub(lambda _: f"{start}\n{table(stage, results.get(stage) or {})}\n{end}", text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = ap.parse_args()
    old = README.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md's method tables differ from the registry: run python scripts/readme_methods.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
