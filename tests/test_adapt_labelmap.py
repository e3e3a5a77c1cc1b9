"""Label maps for adaptation between label sets (``label_map`` / ``--label-map``): relabelling, partial
adaptation (unmapped source classes dropped), and the one-line errors of a bad map."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import yaml
from _cli import bad, ok

from transferkit.adapt import adapt
from transferkit.adapt.run import map_source
from transferkit.data.dataset import Dataset
from transferkit.errors import ConfigError, DataError


def _ds(y, classes, name="src"):
    y = np.asarray(y, dtype=np.int64)
    X = np.arange(len(y) * 4, dtype=np.uint8).reshape(len(y), 2, 2)
    return Dataset(name, "image", X, y, list(classes))


def test_map_source_relabels_by_name_and_drops_unmapped_classes():
    src = _ds([0, 1, 2, 2, 1, 0, 2], ["cat", "dog", "fox"])
    out = map_source(src, {"fox": "b", "cat": "a"}, ["a", "b"])
    assert out.classes == ["a", "b"]
    kept = np.flatnonzero(src.y != 1)  # dogs dropped, order kept
    np.testing.assert_array_equal(out.X, src.X[kept])
    np.testing.assert_array_equal(out.y, [0, 1, 1, 0, 1])
    # two source classes onto one target class
    both = map_source(src, {"cat": "a", "dog": "a", "fox": "b"}, ["a", "b"])
    np.testing.assert_array_equal(both.y, [0, 0, 1, 1, 0, 0, 1])
    assert len(src) == 7 and src.classes == ["cat", "dog", "fox"]  # the input is untouched


@pytest.mark.parametrize("label_map, err, match", [
    ({"cta": "a"}, ConfigError, "'cta', not a class of the source 'src' (did you mean 'cat'?)"),
    ({"cat": "c"}, ConfigError, "maps to 'c', not a class of the target"),
    ({}, ConfigError, "non-empty mapping"),
    (["cat"], ConfigError, "non-empty mapping"),
    ({"cat": "a"}, DataError, "gives the target class 'b' no source item"),
])
def test_bad_label_maps_are_one_line_errors(label_map, err, match):
    with pytest.raises(err, match=re.escape(match)):
        map_source(_ds([0, 1, 2], ["cat", "dog", "fox"]), label_map, ["a", "b"])


@pytest.mark.assets
def test_adapting_through_a_label_map_equals_adapting_the_renamed_source():
    """The source's classes renamed and reordered, mapped back by name: the same adapted predictions as the
    original source (the map is a relabelling, nothing else)."""
    from transferkit.data import load_dataset
    from transferkit.data.split import make_split
    from transferkit.zoo import load_model

    source = load_dataset("sklearn-digits", per_class=20, seed=0)
    train, test, _ = make_split("opencv-digits", per_class=12, sample_seed=0, seed=0, test_size=0.5)
    perm = np.roll(np.arange(10), 3)  # original class c becomes position perm[c]
    names = [None] * 10
    for c in range(10):
        names[perm[c]] = f"digit {source.classes[c]}"
    renamed = replace(source, y=perm[source.y], classes=names)
    opts = {"source_epochs": 1, "batch_size": 20}
    plain = adapt(load_model("digits-usps"), source, train, test, method="bn", options=opts, seed=0)
    mapped = adapt(load_model("digits-usps"), renamed, train, test, method="bn", options=opts, seed=0,
                   label_map={f"digit {c}": c for c in source.classes})
    assert mapped.metrics["label_map"]["digit 3"] == "3" and mapped.metrics["source_items_dropped"] == 0
    assert mapped.metrics["accuracy"] == plain.metrics["accuracy"]
    for k in plain.predictions:
        np.testing.assert_array_equal(mapped.predictions[k], plain.predictions[k])


@pytest.mark.assets
def test_cli_label_map_partial_source_and_bad_map(tmp_path):
    def npz(name, classes):
        rng = np.random.default_rng(classes)
        path = tmp_path / f"{name}.npz"
        np.savez(path, X=rng.integers(0, 255, (60, 8, 8)).astype(np.uint8), y=np.arange(60) % classes)
        return path

    src, tgt = npz("src", 3), npz("tgt", 2)
    lm = tmp_path / "map.yaml"
    base = ["adapt", "--source", src, "--target", tgt, "--model", "digits-usps", "--method", "bn"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"source_epochs": 1, "batch_size": 10}))
    lm.write_text(yaml.safe_dump({"0": "0", "5": "1"}))
    bad([*base, "--label-map", lm, "--config", cfg, "--out", tmp_path / "o"], "'5', not a class of the source")
    assert not (tmp_path / "o").exists()
    lm.write_text(yaml.safe_dump({"0": "1", "1": "0"}))  # swapped; source class 2 dropped
    m = json.loads(ok([*base, "--label-map", lm, "--config", cfg, "--out", tmp_path / "o", "--json"]).stdout)
    assert m["label_map"] == {"0": "1", "1": "0"} and m["source_items_dropped"] == 20 and m["n_source"] == 40
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["label_map"] == m["label_map"]


@pytest.mark.parametrize("maps, match", [
    ({"opencv-digit": {"0": "0"}}, "not a target with a source (did you mean 'opencv-digits'?)"),
    ({"opencv-digits": {}}, "adapt.label_maps.opencv-digits is empty"),
    ({"opencv-digits": ["0"]}, "adapt.label_maps.opencv-digits must be a mapping"),
])
def test_pipeline_label_maps_are_checked_at_load_time(maps, match):
    from transferkit.pipeline import load_config

    section = {"method": "bn", "sources": {"opencv-digits": "mnist"}, "label_maps": maps}
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_config({"targets": ["opencv-digits"], "models": ["digits-usps"], "adapt": section})
