"""Circular validation, MixVal and MaNo: skada 0.6.0's values on a fixed small input (tests/data/skada_scorers.json,
made by ``benchmarks/adapt_select.py --fixture`` in a separate venv), naive loop implementations, invariances, the
MaNo reference's defects, bad options, and use as engine scorers."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_adapt_tta import toy_data, toy_model
from torch import nn

from transferkit import registry
from transferkit.adapt import check_method, scorers, selection
from transferkit.data import combine_domains, make_dataset
from transferkit.engine import TrainConfig, train
from transferkit.errors import ConfigError

FIXTURE = json.loads((Path(__file__).parent / "data" / "skada_scorers.json").read_text())
ZS, YS = np.array(FIXTURE["source_features"]), np.array(FIXTURE["source_labels"])
ZT = np.array(FIXTURE["target_features"])
CLASSES = ["a", "b", "c"]


class Head(nn.Module):
    """A classifier whose backbone is ``backbone`` (identity by default) and whose head is the linear (W, b)."""

    def __init__(self, W, b, backbone=None):
        super().__init__()
        self.backbone = backbone or nn.Identity()
        self.head = nn.Linear(W.shape[1], W.shape[0]).double()
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(W))
            self.head.bias.copy_(torch.as_tensor(b))

    def forward(self, x):
        return self.head(self.backbone(x))


def as_tensor(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def domains():
    return combine_domains(make_dataset("s", ZS, YS, classes=CLASSES), make_dataset("t", ZT, classes=CLASSES))


def score(name, model, data, **options):
    return scorers.make_scorer(name, as_tensor, **options)(model, data)


@pytest.mark.parametrize("case", range(len(FIXTURE["cases"])))
def test_scorers_reproduce_skada(case):
    c = FIXTURE["cases"][case]
    W, b, sk = np.array(c["W"]), np.array(c["b"]), c["skada"]
    model, k = Head(W, b), W.shape[0]
    # same definitions: equal (the logits pass through float32, hence the tolerance)
    assert score("snd", model, ZT) == pytest.approx(sk["snd"], rel=1e-6)
    assert score("iwv", model, domains()) == pytest.approx(sk["iwv"], rel=1e-5)
    assert score("circular", model, domains()) == pytest.approx(sk["circular"], abs=1e-12)
    for ice in ("both", "intra", "inter"):
        assert score("mixval", model, ZT, ice=ice) == pytest.approx(sk["mixval" if ice == "both" else f"mixval_{ice}"])
    # skada's PredictionEntropyScorer negates (greater_is_better=False) the mean over all N × C entries
    assert score("entropy", model, ZT) == pytest.approx(-k * sk["entropy"], rel=1e-6)
    # skada's MaNo on an sklearn estimator always normalises by softmax: ours with threshold 0
    assert score("mano", model, ZT, threshold=0.0) == pytest.approx(sk["mano"], rel=1e-6)
    # skada's deep path picks the normalisation by the criterion as we do, but its _get_criterion subtracts the
    # row max from the logits in place, so its Taylor softmax sees z − max z (softmax does not notice)
    z = torch.as_tensor(ZT @ W.T + b)
    taylor = -torch.log_softmax(z, -1).mean() <= 5.0
    assert sk["mano_deep_normalization"] == ("taylor" if taylor else "softmax")
    assert selection.mano(z - z.max(-1, keepdim=True).values) == pytest.approx(sk["mano_deep"], rel=1e-6)
    if taylor:
        assert selection.mano(z) != pytest.approx(sk["mano_deep"], rel=1e-3)
    else:
        assert selection.mano(z) == pytest.approx(sk["mano_deep"], rel=1e-6)


def test_dev_on_skadas_source_split_and_skadas_broadcasting_defect():
    """Our DEV draws its own 67/33 split; on skada's split (recorded in the fixture) the weights and losses are
    skada's. skada 0.6.0 keeps the weights as an (n, 1) column and the losses as (n,), so w·ℓ broadcasts to an
    n × n matrix: its DEV is mean(w)·mean(ℓ) + η'(mean(w) − 1), η' = −Cov(w_i ℓ_0, w_i ℓ_1) / Var(w) — not the
    paper's control variate, which ``dev_risk`` computes."""
    from sklearn.linear_model import LogisticRegression

    c = FIXTURE["cases"][0]
    W, b, split = np.array(c["W"]), np.array(c["b"]), c["skada"]["dev_split"]
    fit, val = np.array(split["fit"]), np.array(split["val"])
    clf = LogisticRegression().fit(np.concatenate([ZS[fit], ZT]), np.r_[np.ones(len(fit)), np.zeros(len(ZT))])
    p = clf.predict_proba(ZS[val])
    w = len(fit) / len(ZT) * p[:, 0] / p[:, 1]
    probs = torch.as_tensor(ZS[val] @ W.T + b).softmax(-1).numpy()
    loss = -np.log(probs[np.arange(len(val)), YS[val]])
    wl = w[:, None] * loss[None, :]
    eta = -np.cov(wl[:, 0], wl[:, 1])[0, 1] / np.var(w, ddof=1)
    skada_formula = wl.mean() + eta * w.mean() - eta
    assert -c["skada"]["dev"] == pytest.approx(skada_formula, rel=1e-6)  # skada negates (greater_is_better=False)
    loops = np.mean([w[i] * loss[i] for i in range(len(w))])
    cov = sum((w[i] * loss[i] - loops) * (w[i] - w.mean()) for i in range(len(w))) / (len(w) - 1)
    eta = -cov / np.var(w, ddof=1)
    assert scorers.dev_risk(w, loss) == pytest.approx(loops + eta * w.mean() - eta, rel=1e-9)
    assert abs(scorers.dev_risk(w, loss) - skada_formula) > 1e-3


def _mano_loops(z: np.ndarray, p: float = 4.0, threshold: float = 5.0) -> float:
    n, k = z.shape
    crit = 0.0
    for i in range(n):
        m = max(z[i])
        lse = m + math.log(sum(math.exp(v - m) for v in z[i]))
        crit += sum(lse - v for v in z[i])
    rows = []
    for i in range(n):
        if crit / (n * k) > threshold:
            e = [math.exp(v - max(z[i])) for v in z[i]]
            rows.append([v / sum(e) for v in e])
        else:
            t = [1 + v + v * v / 2 for v in z[i]]
            t = [v - min(t) for v in t]
            rows.append([v / sum(t) for v in t])
    return (sum(v ** p for r in rows for v in r) / (n * k)) ** (1 / p)


@pytest.mark.parametrize("scale,p", [(0.5, 4.0), (6.0, 4.0), (6.0, 2.0)])
def test_mano_matches_a_loop_implementation_in_both_branches(scale, p):
    z = scale * torch.randn(30, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    crit = float(-torch.log_softmax(z, -1).mean())
    assert (crit > 5.0) == (scale > 1)  # the two scales exercise the two normalisations
    assert selection.mano(z, p) == pytest.approx(_mano_loops(z.numpy(), p), rel=1e-10)


def test_mano_is_invariant_to_the_order_of_items_and_classes_and_reaches_its_extremes():
    z = 4 * torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.randperm(40, generator=g), torch.randperm(6, generator=g)
    assert selection.mano(z[rows][:, cols]) == pytest.approx(selection.mano(z), rel=1e-12)
    # one-hot softmax rows: (1/K)^(1/p); uniform rows: 1/K (the Taylor branch normalises equal logits to zeros,
    # as the reference's F.normalize: a threshold below the criterion keeps softmax)
    assert selection.mano(1e3 * torch.eye(6)) == pytest.approx((1 / 6) ** 0.25)
    assert selection.mano(torch.zeros(5, 6), threshold=0.0) == pytest.approx(1 / 6)


def test_mano_and_mixval_do_not_depend_on_the_batch_size():
    """The MaNo reference divides each shuffled batch's norm by the full N·K and averages over batches."""
    model, data = toy_model(), toy_data(45)
    clf = Head(model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy(),
               model.backbone)
    clf.float()
    for name in ("mano", "mixval"):
        a = scorers.make_scorer(name, model.preprocess, batch_size=7)(clf, data.X)
        b = scorers.make_scorer(name, model.preprocess, batch_size=256)(clf, data)
        assert a == pytest.approx(b, rel=1e-6), name


def _mixval_loops(model, X, lam, seed, ice):
    n = len(X)
    perm = np.random.RandomState(seed).permutation(n)
    with torch.no_grad():
        pred = [int(model(as_tensor(X[i:i + 1])).argmax()) for i in range(n)]
        hits = {True: [], False: []}
        for i in range(n):
            j = perm[i]
            mix = lam * as_tensor(X[i:i + 1]) + (1 - lam) * as_tensor(X[j:j + 1])
            label = pred[i] if lam >= 0.5 else pred[j]
            hits[pred[i] == pred[j]].append(int(model(mix).argmax()) == label)
    intra, inter = np.mean(hits[True]), np.mean(hits[False])
    return {"intra": intra, "inter": inter, "both": (intra + inter) / 2}[ice]


@pytest.mark.parametrize("lam,ice,seed", [(0.55, "both", 0), (0.3, "inter", 1), (0.8, "intra", 2)])
def test_mixval_matches_a_loop_implementation(lam, ice, seed):
    rng = np.random.default_rng(seed)
    model = Head(rng.normal(size=(3, 4)), rng.normal(size=3))
    X = rng.normal(size=(50, 4))
    want = _mixval_loops(model, X, lam, seed, ice)
    assert score("mixval", model, X, lam=lam, ice=ice, seed=seed) == pytest.approx(want)


class NearestCentre(nn.Module):
    def __init__(self, centres):
        super().__init__()
        self.centres = torch.as_tensor(centres)

    def forward(self, x):
        return -torch.cdist(x, self.centres)


class RandomLabels(nn.Module):
    """1-NN to memorised items with random labels: its decision regions are unrelated to the data's structure."""

    def __init__(self, items, k, seed=0):
        super().__init__()
        self.items = torch.as_tensor(items)
        self.labels = torch.as_tensor(np.random.default_rng(seed).integers(0, k, len(items)))
        self.k = k
        self.p = nn.Parameter(torch.zeros(1))  # predict_logits reads the device of a parameter

    def forward(self, x):
        return nn.functional.one_hot(self.labels[torch.cdist(x, self.items).argmin(1)], self.k).double()


def test_mixval_scores_a_perfect_classifier_1_and_a_random_one_near_chance():
    k, rng = 5, np.random.default_rng(0)
    centres = 10 * np.eye(k)
    y = np.arange(300) % k
    X = centres[y] + 0.1 * rng.normal(size=(300, k))
    perfect = NearestCentre(centres)
    perfect.p = nn.Parameter(torch.zeros(1))
    assert score("mixval", perfect, X) == 1.0
    rand = score("mixval", RandomLabels(X, k), X, ice="inter")
    assert abs(rand - 1 / k) < 0.1


def test_circular_validation_is_invariant_to_rescaling_the_features():
    """The backward head is fitted on standardised features: a model whose features are scaled (and its head
    unscaled, so the same predictions) gets the same score."""
    W, b = np.array(FIXTURE["cases"][0]["W"]), np.array(FIXTURE["cases"][0]["b"])
    scale = torch.tensor([3.0, 0.2, 50.0, 1.0], dtype=torch.float64)
    scaled = Head(W / scale.numpy(), b, backbone=_Scale(scale))
    assert score("circular", scaled, domains()) == pytest.approx(score("circular", Head(W, b), domains()))


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


def test_circular_validation_of_one_pseudo_class_is_the_constant_prediction():
    fs, ys, ft = ZS, YS, ZT
    assert selection.circular_validation(fs, ys, ft, np.full(len(ft), 2)) == pytest.approx(1 / 3)
    # a labelling of the target that a linear head can reproduce from the source's labelling scores high,
    # the same labels permuted at random score near chance
    good = Head(np.array(FIXTURE["cases"][2]["W"]), np.array(FIXTURE["cases"][2]["b"]))
    pt = good(as_tensor(ft)).argmax(-1).numpy()
    rng = np.random.default_rng(0)
    assert selection.circular_validation(fs, ys, ft, pt) > 0.75
    assert selection.circular_validation(fs, ys, ft, rng.permutation(pt)) < 0.6


def test_circular_validation_with_pseudo_labels_missing_a_class():
    """skada #245: a deep model whose target pseudo-labels miss a source class fails its backward fit with a
    ValueError; the backward head here predicts the classes it saw, and the source's balanced accuracy counts
    the missing class as never recalled."""
    pt = (ZT[:, 0] > 0).astype(int)  # classes 0 and 1 only
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    zs, zt = scorers.standardise(ZS, ZT)
    want = balanced_accuracy_score(YS, LogisticRegression(max_iter=1000).fit(zt, pt).predict(zs))
    got = selection.circular_validation(ZS, YS, ZT, pt)
    assert got == pytest.approx(want) and got <= 2 / 3 + 1e-12


def test_scoring_leaves_the_model_as_it_was():
    """skada #163 deep-copies the estimator for circular validation; ours never copies or trains the candidate."""
    model = toy_model()
    clf = Head(model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy(),
               model.backbone).float().train()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    data = combine_domains(toy_data(30), toy_data(30, seed=1, shift=20))
    for name in ("circular", "mixval", "mano"):
        scorers.make_scorer(name, model.preprocess)(clf, data)
    assert clf.training and all(torch.equal(before[k], v) for k, v in clf.state_dict().items())


def test_registered_as_scorers_and_refused_as_methods():
    for name, better in (("circular", True), ("mixval", True), ("mano", True)):
        m = registry.get("adapt", name)
        assert m.info["kind"] == "scorer" and m.info["higher_is_better"] is better
        s = scorers.make_scorer(name, as_tensor)
        assert s.name == name and s.higher_is_better is better
        with pytest.raises(ConfigError, match="scorer"):
            check_method(name)


@pytest.mark.parametrize("name,options,match", [
    ("mano", {"p": 0.0}, "p"), ("mano", {"threshold": -1.0}, "threshold"), ("mixval", {"lam": 1.0}, "lam"),
    ("mixval", {"ice": "all"}, "ice"), ("mixval", {"seed": -1}, "seed"), ("circular", {"C": 0.0}, "C"),
    ("circular", {"bandwidth": 1.0}, "bandwidth")])
def test_bad_options_are_one_line_errors(name, options, match):
    with pytest.raises(ConfigError, match=match) as e:
        scorers.make_scorer(name, as_tensor, **options)
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors():
    model = Head(np.array(FIXTURE["cases"][0]["W"]), np.array(FIXTURE["cases"][0]["b"]))
    with pytest.raises(ConfigError, match="labelled source and unlabelled target"):
        score("circular", model, ZT)
    with pytest.raises(ConfigError, match="at least 2"):
        score("mixval", model, ZT[:1])
    tokens = lambda x: {"input_ids": torch.zeros(len(x), 4, dtype=torch.long)}  # noqa: E731
    with pytest.raises(ConfigError, match="not tokenised text"):
        scorers.make_scorer("mixval", tokens)(model, ["a b", "c d"])


def test_mano_and_mixval_drive_engine_selection():
    from transferkit.tune._common import Pairs, make_collate

    model, data = toy_model(), toy_data(30)
    clf = Head(model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy(),
               model.backbone).float()
    for name in ("mano", "mixval"):
        s = scorers.make_scorer(name, model.preprocess)
        res = train(clf, Pairs(data.X, data.y), None, TrainConfig(epochs=2, batch_size=10, progress=False,
                                                                   restore_best=True),
                    collate_fn=make_collate(model.preprocess), val_data=data.X, metric=s)
        vals = {h["step"]: h[f"val_{name}"] for h in res.history if f"val_{name}" in h}
        assert len(vals) == 2 and res.best_step == max(vals, key=vals.get)
