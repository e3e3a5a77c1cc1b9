"""The README's method tables are generated from the registry and list every registered method."""

import importlib.util
import re
from pathlib import Path

import yaml

from transferkit import registry

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("rank", "tune", "merge", "adapt", "distill")  # the stages whose methods have a README table


def _script():
    spec = importlib.util.spec_from_file_location("readme_methods", ROOT / "scripts" / "readme_methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_method_tables_are_the_registrys():
    text = (ROOT / "README.md").read_text()
    assert _script().render(text) == text, "run: python scripts/readme_methods.py"
    for stage in STAGES:
        block = text.split(f"<!-- methods:{stage}:start -->")[1].split(f"<!-- methods:{stage}:end -->")[0]
        listed = re.findall(r"^\| `([^`]+)` \|", block, re.M)
        assert listed == list(registry.methods(stage)), stage


def test_every_registered_method_has_a_measured_result_line():
    results = yaml.safe_load((ROOT / "docs" / "method_results.yaml").read_text())
    for stage in STAGES:
        missing = set(registry.methods(stage)) - set(results.get(stage) or {})
        assert not missing, f"{stage}: no result line for {sorted(missing)} in docs/method_results.yaml"
        stale = set(results.get(stage) or {}) - set(registry.methods(stage))
        assert not stale, f"{stage}: results for unregistered methods {sorted(stale)}"


def test_a_missing_method_fails_the_check(monkeypatch):
    """The check is not vacuous: registering one more method makes the README stale."""
    text = (ROOT / "README.md").read_text()
    monkeypatch.setitem(registry._REGISTRY, "merge", dict(registry.methods("merge")))
    registry.register("merge", "extra", paper="p", summary="s", fn=lambda deltas: deltas)
    assert _script().render(text) != text
