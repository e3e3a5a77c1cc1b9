"""Noise as source (KTF): the noise's class-conditional statistics and seeding, the few-label selection
(stratified, training part only), the discrepancy against a matrix formulation, the source entering only
through β and μ, a spy that no held-out item is trained on, real digits end to end (library and CLI), and bad
input as one-line errors."""

import json

import numpy as np
import pytest
import torch
import yaml
from _cli import bad, ok
from torch import nn

from transferkit.adapt import adapt, noise
from transferkit.adapt.run import few_labels
from transferkit.data import make_dataset
from transferkit.errors import ConfigError, DataError
from transferkit.zoo.base import ImagePreprocess, ZooModel

CLASSES = ["0", "1", "2"]
FAST = {"steps": 30, "noise_per_class": 50, "noise_dim": 16}


def toy_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU())
    return ZooModel("toy", "image", backbone, nn.Linear(8, 3), 8, ImagePreprocess(8, [0.5], [0.5], 1), {},
                    list(CLASSES))


def toy_data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    X = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
    for c in range(3):
        X[y == c, 2 * c: 2 * c + 2, :] += 120
    return make_dataset(f"toy{seed}", X, y, classes=CLASSES)


def test_the_noise_is_class_conditional_gaussian_with_the_stated_moments():
    X, y, means = noise.gaussian_source(3, 6, 4000, seed=1)
    assert X.shape == (12000, 6) and X.dtype == np.float32 and np.bincount(y).tolist() == [4000] * 3
    for k in range(3):
        Xk = X[y == k].astype(np.float64)
        assert np.abs(Xk.mean(0) - means[k]).max() < 5 / np.sqrt(4000)  # mean μ_k
        assert np.abs(np.cov(Xk.T) - np.eye(6)).max() < 0.12  # covariance I
    _, _, wide = noise.gaussian_source(4, 5000, 1, seed=1)  # μ_k ~ N(0, I)
    assert abs(wide.mean()) < 0.02 and abs(wide.std() - 1) < 0.02
    again = noise.gaussian_source(3, 6, 4000, seed=1)
    assert np.array_equal(again[0], X) and np.array_equal(again[2], means)
    assert not np.array_equal(noise.gaussian_source(3, 6, 4000, seed=2)[0], X)


def test_few_labels_are_stratified_seeded_and_only_labelled_items():
    y = np.array([0, 1, 2, -1, 0, 1, 2, -1, 0, 1, 2, 0, 1, 2, 0])
    ds = make_dataset("d", np.zeros((len(y), 2)), y, classes=CLASSES)
    pos = few_labels(ds, 3, seed=0)
    assert len(pos) == 9 and np.bincount(y[pos]).tolist() == [3, 3, 3] and (y[pos] >= 0).all()
    assert np.array_equal(pos, np.sort(pos)) and np.array_equal(pos, few_labels(ds, 3, seed=0))
    assert any(not np.array_equal(few_labels(ds, 2, seed=s), few_labels(ds, 2, seed=0)) for s in range(1, 6))
    with pytest.raises(DataError, match="labelled_per_class 5 is more than the 4 labelled item"):
        few_labels(ds, 5, seed=0)


def test_mmd_equals_its_matrix_form():
    g = torch.Generator().manual_seed(0)
    ps, pl, pu = torch.randn(12, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    ys, yl = torch.arange(12) % 3, torch.arange(6) % 3
    soft = torch.randn(9, 3, generator=g).softmax(-1)
    Ys, Yl = nn.functional.one_hot(ys, 3).float(), nn.functional.one_hot(yl, 3).float()
    src_means = (Ys.T @ ps) / Ys.sum(0)[:, None]
    tgt_means = (Yl.T @ pl + soft.T @ pu) / (Yl.sum(0) + soft.sum(0))[:, None]
    marginal = ((ps.mean(0) - torch.cat([pl, pu]).mean(0)) ** 2).sum()
    expected = (marginal + ((src_means - tgt_means) ** 2).sum()) / 4
    assert torch.allclose(noise.mmd(ps, ys, pl, yl, pu, soft), expected, atol=1e-6)


def test_the_source_enters_only_through_beta_and_mu():
    model, src, tgt = toy_model(), toy_data(30), toy_data(60, seed=1)
    off = adapt(model, src, tgt, tgt, method="noise", options={**FAST, "beta": 0.0, "mu": 0.0}, seed=3)
    none = adapt(model, src, tgt, tgt, method="noise", options={**FAST, "source": "none"}, seed=3)
    on = adapt(model, src, tgt, tgt, method="noise", options=FAST, seed=3)
    for a, b in zip(off.module.parameters(), none.module.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(on.module.parameters(), none.module.parameters()))
    assert none.metrics["n_source_rows"] == 0 and on.metrics["n_source_rows"] == 150


def test_a_spy_sees_no_held_out_item_in_training(monkeypatch):
    seen = {}
    fit = noise.fit_ktf

    def spy(xt, yt, *a, **k):
        seen["xt"], seen["yt"] = xt.copy(), yt.copy()
        return fit(xt, yt, *a, **k)

    monkeypatch.setattr(noise, "fit_ktf", spy)
    model, train, test = toy_model(), toy_data(60, seed=1), toy_data(30, seed=2)
    res = adapt(model, toy_data(30), train, test, method="noise", options={**FAST, "labelled_per_class": 4},
                seed=0)
    feats = {}
    with torch.no_grad():
        for name, ds in (("train", train), ("test", test)):
            feats[name] = model.backbone(model.preprocess(ds.X)).numpy()
    assert np.allclose(seen["xt"], feats["train"], atol=1e-6)  # the training part, in order, and nothing else
    dist = np.abs(seen["xt"][:, None] - feats["test"][None]).sum(-1)
    assert dist.min() > 1e-3  # no held-out item among the training rows
    used = res.metrics["target_labels_used"]
    assert np.flatnonzero(seen["yt"] >= 0).tolist() == used and len(used) == 12
    assert np.array_equal(seen["yt"][used], train.y[used])  # the true labels of those items only
    assert res.metrics["target_labels_ignored"] == 60 - 12 and res.metrics["n_scored"] == 30
    assert res.predictions["adapted"].shape == (30,)


def test_bad_input_is_one_line():
    model, data = toy_model(), toy_data(30)
    with pytest.raises(ConfigError, match="labelled_per_class of adapt method 'noise' must be >= 1"):
        adapt(model, data, data, data, method="noise", options={"labelled_per_class": 0})
    with pytest.raises(DataError, match="labelled_per_class 11 is more than the 10 labelled item"):
        adapt(model, data, data, data, method="noise", options={"labelled_per_class": 11})
    with pytest.raises(ConfigError, match="source"):
        adapt(model, data, data, data, method="noise", options={"source": "text"})
    two = make_dataset("two", data.X[data.y < 2], data.y[data.y < 2], classes=CLASSES)
    with pytest.raises(DataError, match="no item of class"):
        adapt(model, two, data, data, method="noise", options={**FAST, "source": "pixels"})


@pytest.mark.assets
def test_real_digits_end_to_end():
    """MNIST pixels / noise as source → scikit-learn digits seen through the USPS CNN, 3 labels per class."""
    from transferkit.data import load_dataset
    from transferkit.data.split import make_split
    from transferkit.zoo import load_model

    model = load_model("digits-usps")
    src = load_dataset("mnist", limit=300, seed=0)
    train, test, _ = make_split("sklearn-digits", limit=400, sample_seed=0, seed=0, test_size=0.3)
    acc = {}
    for source in ("noise", "pixels"):
        opts = {"source": source, "steps": 100, "noise_per_class": 100}
        m = adapt(model, src, train, test, method="noise", options=opts, seed=0).metrics
        assert len(m["target_labels_used"]) == 30 and m["n_scored"] == len(test) == 120
        acc[source] = m["accuracy"]
    assert min(acc.values()) > 0.4, acc  # ten classes: far above chance with 3 labels per class


@pytest.mark.assets
def test_cli_prints_the_target_labels_it_uses_and_refuses_too_many(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"steps": 20, "labelled_per_class": 2}))
    out = tmp_path / "run"
    args = ["adapt", "--source", "mnist", "--target", "sklearn-digits", "--model", "digits-usps", "--method", "noise",
            "--limit", "200", "--config", cfg]
    res = ok([*args, "--out", out, "--json"])
    note = next(line for line in res.stderr.splitlines() if "target labels used for training" in line)
    ids = json.loads(note.split("item ids ")[1].split(" of ")[0])
    split = json.loads((out / "split.json").read_text())
    assert len(ids) == 20 and not set(ids) & set(split["test_ids"]) and "not used for adaptation" not in res.stderr
    assert json.loads(res.stdout)["target_labels_ignored"] == split["n"] - len(split["test_ids"]) - 20
    cfg.write_text(yaml.safe_dump({"labelled_per_class": 500}))
    bad([*args, "--out", tmp_path / "o"], "labelled_per_class 500 is more than")
    assert not (tmp_path / "o").exists()
