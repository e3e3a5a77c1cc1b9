"""distill: a teacher over other classes — a one-line error naming both label sets unless a label map is given;
the map's summing rule by hand, the identity map is the teacher itself, the map on a real catalogue teacher; the
other bad inputs of the issue (a teacher that cannot be frozen into a classifier, T ≤ 0, α outside [0, 1])."""

import json

import numpy as np
import pytest
import torch
from _cli import bad, ok
from torch import nn

from transferkit import registry
from transferkit.distill import Net, distill
from transferkit.distill._common import LabelMapped, map_teachers
from transferkit.errors import ConfigError
from transferkit.zoo.base import Classifier, ZooModel

DIGITS = [str(c) for c in range(10)]


def _pre(raw):
    return torch.as_tensor(np.asarray(raw), dtype=torch.float32).reshape(len(raw), -1) / 16.0


def _toy(name, hidden, seed, classes=None):
    torch.manual_seed(seed)
    head = nn.Linear(hidden, len(classes)) if classes else None
    return ZooModel(name, "image", nn.Sequential(nn.Linear(64, hidden), nn.ReLU()), head, hidden, _pre,
                    {"toy": name}, classes)


def _digits(labels=None, classes=DIGITS, n=400):
    """sklearn's bundled 8×8 digits (no download), optionally relabelled, as a train/test pair."""
    from sklearn.datasets import load_digits

    from transferkit.data import make_dataset
    from transferkit.data.split import make_split

    d = load_digits()
    y = d.target[:n] if labels is None else labels(d.target[:n])
    ds = make_dataset("digits8", d.images[:n].astype(np.uint8), y, classes=classes)
    return make_split(ds, dataset=ds, seed=0)[:2]


def _teacher(train):
    """A toy teacher fitted on ``train``'s ten digits."""
    from transferkit.engine import train as fit
    from transferkit.tune._common import Pairs, make_collate

    zoo = _toy("teacher", 32, 1)
    clf = Classifier(zoo.backbone, 32, 10, seed=1)
    fit(clf, Pairs(train.X, train.y), None, {"epochs": 10, "lr": 1e-2, "progress": False},
        collate_fn=make_collate(_pre))
    return Net("teacher", zoo, clf.eval(), DIGITS)


def _student():
    return Net("student", _toy("student", 8, 2), None, None)


# ---------------------------------------------------------------------------------------- the rule
def test_summing_rule_computed_by_hand():
    """Teacher classes a, b → x; c → y; d dropped: at temperature T the target is
    (e^{a/T} + e^{b/T}, e^{c/T}) / (e^{a/T} + e^{b/T} + e^{c/T})."""
    z = torch.tensor([[1.0, 2.0, 0.5, 3.0], [-1.0, 0.0, 4.0, 9.0]])
    for T in (1.0, 4.0):
        mapped = LabelMapped(nn.Identity(), [0, 0, 1, -1], 2, T)(z)
        e = np.exp(z.numpy() / T)
        want = np.stack([e[:, 0] + e[:, 1], e[:, 2]], 1)
        want /= want.sum(1, keepdims=True)
        assert torch.allclose(torch.softmax(mapped / T, -1), torch.tensor(want, dtype=torch.float32), atol=1e-6)
    # the large logit of the dropped class d changes nothing: the kept classes are renormalised
    assert torch.allclose(LabelMapped(nn.Identity(), [0, 0, 1, -1], 2, 1.0)(z)[0].softmax(-1),
                          torch.tensor([np.e + np.e ** 2, np.e ** 0.5]) / (np.e + np.e ** 2 + np.e ** 0.5))


def test_identity_map_is_the_teacher_and_trains_the_same_student():
    train, test = _digits()
    teacher = _teacher(train)
    ident = {c: c for c in DIGITS}
    (mapped,) = map_teachers([teacher], ident, DIGITS, 4.0)
    x = _pre(train.X[:50])
    assert torch.allclose(mapped.module(x), teacher.module(x), atol=1e-5)
    plain = distill([teacher], _student(), train, test, config={"epochs": 2, "lr": 1e-2})
    via_map = distill([teacher], _student(), train, test, config={"epochs": 2, "lr": 1e-2, "label_map": ident})
    for (k, a), b in zip(plain.student.state_dict().items(), via_map.student.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k
    assert via_map.delta.meta["options"]["label_map"] == ident


def test_a_permuted_map_permutes_the_teacher():
    train, _ = _digits()
    teacher = _teacher(train)
    perm = {c: DIGITS[(i + 3) % 10] for i, c in enumerate(DIGITS)}
    (mapped,) = map_teachers([teacher], perm, DIGITS, 2.0)
    x = _pre(train.X[:50])
    z = teacher.module(x)
    assert torch.allclose(mapped.module(x)[:, [(i + 3) % 10 for i in range(10)]], z, atol=1e-5)


def test_a_teacher_over_other_classes_teaches_through_the_map():
    """A digit teacher teaches parity: without a map a one-line error naming both label sets; with
    {even digits → even, odd → odd} the student learns parity from it."""
    digits_train, _ = _digits(n=600)
    teacher = _teacher(digits_train)
    train, test = _digits(lambda y: y % 2, ["even", "odd"], n=600)
    with pytest.raises(ConfigError, match=r"predicts \['0', '1'.*not the data's classes \['even', 'odd'\].*label_map"):
        distill([teacher], _student(), train, test, config={"epochs": 1})
    parity = {c: ("even", "odd")[int(c) % 2] for c in DIGITS}
    res = distill([teacher], _student(), train, test, config={"epochs": 10, "lr": 1e-2, "label_map": parity})
    m = res.metrics
    assert m["teacher_test_accuracy"]["teacher"] > 0.9
    assert m["test_accuracy"] > 0.8


# ---------------------------------------------------------------------------------------- bad maps
@pytest.mark.parametrize("label_map, message", [
    ({"0": "zero"}, "label_map maps to ['zero'], not classes of the data"),
    ({"cat": "0"}, "label_map maps ['cat'], which no teacher predicts"),
    ({c: "0" for c in DIGITS}, "to the data classes ['1', '2', '3'"),
])
def test_bad_maps_are_one_line_errors(label_map, message):
    train, test = _digits(n=100)
    teacher = Net("t", _toy("t", 8, 0, DIGITS), None, DIGITS)
    with pytest.raises(ConfigError) as err:
        distill([teacher], _student(), train, test, config={"epochs": 1, "label_map": label_map})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_headless_teacher_has_nothing_to_map():
    train, test = _digits(n=100)
    with pytest.raises(ConfigError, match="has no classification head, so label_map"):
        distill([Net("bare", _toy("bare", 8, 0), None, None)], _student(), train, test,
                config={"label_map": {"0": "0"}})


@pytest.mark.parametrize("value, message", [
    ({}, "label_map must map class names"), ({"0": ["1"]}, "label_map must map class names"),
    ({"0": True}, "label_map must map class names"), (["0"], "label_map of distill method .kd. must be dict"),
])
def test_bad_label_map_options(value, message):
    with pytest.raises(ConfigError, match=message):
        registry.get("distill", "kd").parse({"label_map": value})
    assert registry.get("distill", "kd").parse({"label_map": {0: 1}}).label_map == {"0": "1"}  # YAML ints


# ---------------------------------------------------------------------------------------- CLI
def _yaml(tmp_path, text, name="m.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("alpha: -0.1\n", "alpha"), ("temperature: -2\n", "temperature"),
    ("label_map: [a, b]\n", "label_map of distill method 'kd' must be dict"),
])
def test_bad_options_fail_before_any_data_is_loaded(text, message, tmp_path):
    out = tmp_path / "out"
    bad(["distill", "--data", "no-such-data", "--teacher", "x", "--student", "y", "--config", _yaml(tmp_path, text),
         "--out", out], message)
    assert not out.exists()


def test_label_map_file_that_is_not_a_mapping(tmp_path):
    out = tmp_path / "out"
    bad(["distill", "--data", "no-such-data", "--teacher", "x", "--student", "y", "--label-map",
         _yaml(tmp_path, "- a\n- b\n"), "--out", out], "must hold a mapping")
    bad(["distill", "--data", "no-such-data", "--teacher", "x", "--student", "y", "--method", "nearest",
         "--label-map", _yaml(tmp_path, "a: b\n"), "--out", out], "unknown option 'label_map'")
    assert not out.exists()


@pytest.mark.assets
@pytest.mark.parametrize("args, message", [
    (["--teacher", "mobilenet-v2"], "predicts ['0', '1', '2'"),  # both label sets named, the map suggested
    (["--teacher", "digits-mnist", "--label-map", "zero.yaml"], "label_map maps to ['zero'], not classes of the data"),
])
def test_cli_label_set_errors(args, message, tmp_path):
    out = tmp_path / "out"
    _yaml(tmp_path, "0: zero\n", "zero.yaml")
    args = [str(tmp_path / a) if a.endswith(".yaml") else a for a in args]
    line = bad(["distill", "--data", "sklearn-digits", "--limit", "100", "--student", "digits-usps", *args,
                "--epochs", "1", "--out", out], message)
    if "--label-map" not in args:
        assert "not the data's classes ['0', '1', '2'" in line and "--label-map" in line
    assert not out.exists()


@pytest.mark.assets
def test_teachers_that_cannot_be_frozen_into_a_classifier(tmp_path):
    """A run folder of a method distill cannot load (PEFT prefix tuning) and a headless text encoder."""
    from transferkit.delta import from_states
    from transferkit.zoo import load_model

    zoo = load_model("digits-usps")
    state = {"backbone." + k: v for k, v in zoo.backbone.state_dict().items()}
    delta = from_states(state, state, base_name="digits-usps", meta={"requires": "peft.PrefixTuning",
                                                                     "method": "prefix", "classes": DIGITS})
    delta.save(tmp_path / "prefix" / "delta")
    out = tmp_path / "out"
    bad(["distill", "--data", "sklearn-digits", "--limit", "100", "--teacher", tmp_path / "prefix", "--student",
         "digits-usps", "--epochs", "1", "--out", out], "distill cannot load")
    bad(["distill", "--data", "vader:movies", "--limit", "40", "--teacher", "all-minilm-l6-v2", "--student",
         "paraphrase-minilm-l3-v2", "--epochs", "1", "--out", out], "has no classification head")
    assert not out.exists()


@pytest.mark.assets
def test_cli_map_swapping_two_classes_swaps_the_teachers_predictions(tmp_path):
    """digits-mnist through {0 → 1, 1 → 0}: its reported test accuracy is that of its own predictions with
    0 and 1 swapped, computed a second way from the unmapped model on the run's recorded test items."""
    from transferkit.data.split import held_out, read_split
    from transferkit.distill import load_net
    from transferkit.distill._common import predictions

    swap = _yaml(tmp_path, "".join(f"'{c}': '{ {'0': '1', '1': '0'}.get(c, c) }'\n" for c in DIGITS))
    out = tmp_path / "o"
    res = ok(["distill", "--data", "sklearn-digits", "--limit", "200", "--teacher", "digits-mnist", "--student",
              "digits-usps", "--label-map", swap, "--epochs", "1", "--out", out, "--json"])
    m = json.loads(res.stdout)
    _, test = held_out(read_split(out))
    net = load_net("digits-mnist", test.classes)
    pred = predictions(net.module, net, test)
    swapped = np.where(pred == 0, 1, np.where(pred == 1, 0, pred))
    assert m["teacher_test_accuracy"]["digits-mnist"] == pytest.approx(float(np.mean(swapped == test.y)))
    assert json.loads((out / "delta" / "delta.json").read_text())["meta"]["options"]["label_map"]["0"] == "1"
