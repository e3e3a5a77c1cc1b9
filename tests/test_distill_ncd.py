"""distill ncd: class-relation KD for novel class discovery (Gu et al. ICCV'23) — the Hungarian clustering accuracy
against a brute-force search, the relation/weight maths against a second computation, the reference code's defects,
novel labels never reaching training (spy + label-permutation invariance), the CLI, and a run on real digits."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _cli import bad, ok
from torch import nn

from transferkit import registry
from transferkit.data import UNLABELLED, make_dataset
from transferkit.data.split import make_split
from transferkit.distill import Net, cluster_accuracy, distill, ncd
from transferkit.distill.ncd import (NCDObjective, NCDOptions, cluster_assignment, hide_novel, relation_kd,
                                     relation_weight, sinkhorn, split_known)
from transferkit.errors import ConfigError
from transferkit.zoo.base import ZooModel

CLASSES = [str(c) for c in range(10)]


# ------------------------------------------------------------------------------------------ the metric
def brute_force(y_true, y_pred):
    """Best accuracy over every one-to-one naming of the predicted ids by true labels (or by nothing)."""
    p_ids, t_ids = sorted(set(y_pred)), sorted(set(y_true))
    slots = t_ids + [None] * len(p_ids)  # a cluster may stay unnamed when there are more clusters than classes
    best = 0
    for names in itertools.permutations(slots, len(p_ids)):
        m = dict(zip(p_ids, names))
        best = max(best, sum(m[p] == t for p, t in zip(y_pred, y_true)))
    return best / len(y_true)


@pytest.mark.parametrize("seed", range(40))
def test_cluster_accuracy_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    n, k_true, k_pred = int(rng.integers(1, 13)), int(rng.integers(1, 5)), int(rng.integers(1, 5))
    t_ids = rng.choice(20, k_true, replace=False)  # arbitrary, non-contiguous ids on both sides
    p_ids = rng.choice(50, k_pred, replace=False)
    y_true, y_pred = rng.choice(t_ids, n), rng.choice(p_ids, n)
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(brute_force(list(y_true), list(y_pred)))
    m = cluster_assignment(y_true, y_pred)
    assert len(set(m.values())) == len(m)  # one-to-one


def test_cluster_accuracy_identities():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    perm = rng.permutation(5) + 10
    assert cluster_accuracy(y, perm[y]) == 1.0  # a perfect clustering under any naming
    pred = rng.integers(0, 5, 200)
    assert cluster_accuracy(y, pred) == cluster_accuracy(y, perm[pred])  # naming-invariant
    assert cluster_accuracy(y, pred) >= np.mean(y == pred)  # at least the identity naming
    assert cluster_accuracy(y, np.zeros(200)) == np.bincount(y).max() / 200  # one cluster: the largest class
    assert cluster_accuracy(y, pred) == cluster_accuracy(pred, y)  # the contingency table transposed


def test_empty_cluster_ids_are_counted():
    """Reference defect: ``hungarian_evaluate`` matches over ``range(#distinct predictions)``, so a prediction id
    beyond that (cluster 1 empty, cluster 3 used) is never matched."""
    y_true, y_pred = np.array([5, 5, 6, 6, 7, 7]), np.array([0, 0, 3, 3, 2, 2])
    assert cluster_accuracy(y_true, y_pred) == 1.0
    assert cluster_assignment(y_true, y_pred) == {0: 5, 3: 6, 2: 7}


# ------------------------------------------------------------------------------------------ the loss maths
def test_relation_weight_and_kd_against_a_hand_computation():
    known = torch.tensor([[2.0, 0.5], [-1.0, 1.0], [0.0, 0.0]])
    novel = torch.tensor([[0.0, 1.0, 3.0], [2.0, -2.0, 0.5], [1.0, 1.0, 1.0]])
    teacher = torch.tensor([[1.0, -1.0], [0.3, 0.2], [4.0, 0.0]])
    T = 2.0
    mass = []
    for k, n in zip(known.tolist(), novel.tolist()):
        e = [math.exp(v / T) for v in k + n]
        mass.append(sum(e[:2]) / sum(e))
    w = [m / (sum(mass) / 3) for m in mass]
    kls = []
    for t, s in zip(teacher.tolist(), known.tolist()):
        pt = [math.exp(v / T) / sum(math.exp(u / T) for u in t) for v in t]
        ps = [math.exp(v / T) / sum(math.exp(u / T) for u in s) for v in s]
        kls.append(sum(a * math.log(a / b) for a, b in zip(pt, ps)))
    expected = T * T * sum(wi * kl for wi, kl in zip(w, kls)) / 3
    assert relation_weight(known, novel, T).tolist() == pytest.approx(w, rel=1e-6)
    assert float(relation_kd(teacher, known, novel, T)) == pytest.approx(expected, rel=1e-6)
    unweighted = T * T * sum(kls) / 3
    assert float(relation_kd(teacher, known, novel, T, weighted=False)) == pytest.approx(unweighted, rel=1e-6)
    # an item the learner finds less like the known classes (more novel mass) gets a smaller weight
    more_novel = novel.clone()
    more_novel[0] += 3.0
    assert relation_weight(known, more_novel, T)[0] < relation_weight(known, novel, T)[0]
    assert relation_weight(known, novel - 50.0, T).tolist() == pytest.approx([1.0] * 3)  # all mass on known: equal


def test_kd_is_zero_with_zero_gradient_when_the_relations_agree():
    """Reference defect: it uses ``Σ −p_t log p_s`` (cross-entropy = KL + H(p_t)); with a weight that carries a
    gradient, H(p_t)·w moves the weight — and the network — even when the learner's relation is the teacher's."""
    torch.manual_seed(0)
    known = torch.randn(6, 5, requires_grad=True)
    novel = torch.randn(6, 5, requires_grad=True)
    teacher = known.detach().clone()
    loss = relation_kd(teacher, known, novel, 4.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    assert known.grad.abs().max() < 1e-6 and novel.grad.abs().max() < 1e-6
    # the reference's cross-entropy form does move the weight here (so this test can tell them apart)
    known.grad = novel.grad = None
    T = 4.0
    ce = (-(F.softmax(teacher / T, -1) * torch.log(F.softmax(known / T, -1))).sum(-1)
          * relation_weight(known, novel, T)).mean() * T * T
    ce.backward()
    assert novel.grad.abs().max() > 1e-4


def test_kd_stays_finite_for_large_logits_and_without_unlabelled_items():
    """Reference defects: ``log(softmax)`` underflows to −inf (0·inf = NaN) for large logits; the weight's mean over
    an empty set of unlabelled items is NaN."""
    known = torch.tensor([[3000.0, -3000.0]], requires_grad=True)
    teacher = torch.tensor([[-3000.0, 3000.0]])
    loss = relation_kd(teacher, known, torch.zeros(1, 2), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(known.grad).all()
    empty = torch.zeros(0, 2, requires_grad=True)
    loss = relation_kd(torch.zeros(0, 2), empty, torch.zeros(0, 3), 4.0)
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_sinkhorn_balances_a_skewed_batch():
    torch.manual_seed(0)
    logits = torch.randn(64, 4) * 0.1
    logits[:, 0] += 0.3  # softmax at ε would put almost everything in cluster 0
    q = sinkhorn(logits, 0.05, 3)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)  # each item a distribution
    assert (F.softmax(logits / 0.05, -1).sum(0)[0] > 40) and (q.sum(0) - 16).abs().max() < 3  # near B/K each
    ref = torch.exp(logits / 0.05).double()  # a second computation: plain alternating normalisation
    for _ in range(3):
        ref = ref / ref.sum(0, keepdim=True) / 4
        ref = ref / ref.sum(1, keepdim=True) / 64
    assert torch.allclose(q.double(), ref * 64, atol=1e-5)


# ------------------------------------------------------------------------------------------ the toy setting
def _pre(raw):
    return torch.as_tensor(np.asarray(raw), dtype=torch.float32).reshape(len(raw), -1) / 16.0


def toy_net(seed=0):
    torch.manual_seed(seed)
    zoo = ZooModel("toy", "image", nn.Sequential(nn.Linear(64, 16), nn.ReLU()), None, 16, _pre, {"toy": 1}, None)
    return Net("toy", zoo, None, None)


def digits(n=300, seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    ds = make_dataset("digits8", d.images[:n].astype(np.uint8), d.target[:n], classes=CLASSES)
    train, test, _ = make_split(ds, dataset=ds, seed=seed)
    return train, test


FAST = {"epochs": 2, "pretrain_epochs": 2, "batch_size": 64, "heads": 2, "hidden": 16, "proj": 8}


def test_hide_novel_renumbers_known_and_drops_novel_labels():
    ds = make_dataset("d", np.zeros((6, 2, 2), np.uint8), np.array([0, 3, 1, 4, 3, 2]), classes=["a", "b", "c", "d",
                                                                                               "e"])
    ds.y[5] = UNLABELLED
    out = hide_novel(ds, [3, 0])
    assert out.y.tolist() == [1, 0, -1, -1, 0, -1] and out.classes == ["d", "a"]
    assert ds.y.tolist() == [0, 3, 1, 4, 3, -1]  # the caller's data untouched


def test_novel_labels_never_reach_training(monkeypatch):
    """Spy on every training run (known-class model and discovery): the labels it can read are the known ones
    renumbered and -1; and permuting the novel labels of the training set changes nothing that was trained."""
    train, test = digits()
    seen = []
    real = ncd.train

    def spy(model, data, *args, **kwargs):
        seen.append(np.array([data[i][1] for i in range(len(data))]))
        return real(model, data, *args, **kwargs)

    monkeypatch.setattr(ncd, "train", spy)
    res = distill([toy_net()], toy_net(), train, test, method="ncd", config=FAST)
    assert len(seen) == 2
    novel = np.isin(train.y, range(5, 10))
    assert set(seen[0]) <= set(range(5)) and len(seen[0]) == int((~novel).sum())  # known-class model: known only
    assert sorted(set(seen[1])) == [-1, 0, 1, 2, 3, 4] and (seen[1] == -1).sum() == novel.sum()
    assert np.array_equal(seen[1][~novel], train.y[~novel])  # known labels 0..4 keep their numbers here

    shuffled = train.subset(np.arange(len(train)))
    rng = np.random.default_rng(0)
    shuffled.y[novel] = rng.permutation(shuffled.y[novel])
    shuffled.y[np.flatnonzero(novel)[::2]] = rng.integers(5, 10, len(np.flatnonzero(novel)[::2]))
    assert not np.array_equal(shuffled.y, train.y)
    again = distill([toy_net()], toy_net(), shuffled, test, method="ncd", config=FAST)
    a, b = res.student.state_dict(), again.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("novel_cluster_accuracy", "known_test_accuracy", "test_accuracy", "head_loss"):
        assert res.metrics[key] == again.metrics[key]


def test_alpha_zero_is_the_baseline_and_alpha_changes_training():
    train, test = digits(200)
    base = distill([toy_net()], toy_net(), train, test, method="ncd", config={**FAST, "alpha": 0.0})
    kd = distill([toy_net()], toy_net(), train, test, method="ncd", config={**FAST, "alpha": 1.0})
    disc = [r for r in base.history if r["stage"] == "discover"]
    assert disc and all(r["train_relation_kd"] == 0.0 for r in disc)
    assert all(r["train_relation_kd"] > 0.0 for r in kd.history if r["stage"] == "discover")
    known = [r["train_loss"] for r in base.history if r["stage"] == "known"]
    assert known == [r["train_loss"] for r in kd.history if r["stage"] == "known"]  # stage 1 has no KD
    w = base.student.state_dict()["backbone.0.weight"]
    assert not torch.equal(w, kd.student.state_dict()["backbone.0.weight"])
    m = kd.metrics
    assert m["known_classes"] == CLASSES[:5] and m["novel_classes"] == CLASSES[5:]
    assert 0 <= m["novel_cluster_accuracy"] <= 1 and len(m["novel_cluster_accuracy_heads"]) == 2
    assert m["novel_cluster_accuracy"] == m["novel_cluster_accuracy_heads"][m["best_head"]]
    assert m["best_head"] == int(np.argmin(m["head_loss"]))  # chosen by training loss, not by labels


def test_objective_on_a_batch_without_unlabelled_items_is_finite():
    from transferkit.distill.ncd import KnownNet, NCDNet

    known = KnownNet(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), 8, 3)
    learner = NCDNet(known, 8, 2, heads=2, hidden=8, proj=4)
    obj = NCDObjective(KnownNet(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), 8, 3).eval(), NCDOptions(), 2)
    loss, logs = obj(learner, {"inputs": torch.randn(5, 4), "labels": torch.tensor([0, 1, 2, 0, 1])})
    loss.backward()
    assert torch.isfinite(loss) and logs["relation_kd"] == 0.0


@pytest.mark.parametrize("known, message", [
    (CLASSES, "strict subset"), (["0"], "at least 2 known"), (CLASSES[:9], "2 novel"),
    (["0", "1", "x"], "not classes of the data"),
])
def test_known_classes_must_be_a_strict_subset(known, message):
    with pytest.raises(ConfigError, match=message):
        split_known(CLASSES, known)
    train, test = digits(100)
    with pytest.raises(ConfigError, match=message):  # refused before anything trains
        distill([toy_net()], toy_net(), train, test, method="ncd", config={**FAST, "known_classes": known})


def test_default_known_classes_are_the_first_half():
    assert split_known(CLASSES, None) == (list(range(5)), list(range(5, 10)))
    assert split_known(["b", "a", "c", "d", "e"], ["c", "a"]) == ([2, 1], [0, 3, 4])


def test_registered_with_paper_and_listed():
    m = registry.get("distill", "ncd")
    assert "ICCV 2023" in m.paper
    listed = json.loads(ok(["distill", "--list", "--json"]).stdout)
    assert {o["name"] for o in listed["ncd"]["options"]} >= {"known_classes", "alpha", "kd_temperature", "weighting"}


@pytest.mark.parametrize("args, message", [
    (["--method", "ncd", "--config", "dup"], "duplicates"),
    (["--method", "kd", "--known-classes", "0,1"], "unknown option 'known_classes' for distill method 'kd'"),
])
def test_cli_bad_options_before_data_loads(args, message, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("known_classes: ['1', '1', '2']\n")
    args = [str(cfg) if a == "dup" else a for a in args]
    out = tmp_path / "out"
    bad(["distill", "--data", "no-such-data", "--teacher", "x", "--student", "y", *args, "--out", out], message)
    assert not out.exists()


@pytest.mark.assets
@pytest.mark.parametrize("known, message", [
    ("0,1,2,3,4,5,6,7,8,9", "strict subset"), ("0,1,ten", "not classes of the data"),
])
def test_cli_known_classes_not_a_strict_subset(known, message, tmp_path):
    out = tmp_path / "out"
    bad(["distill", "--data", "opencv-digits", "--per-class", "10", "--teacher", "digits-usps", "--student",
         "digits-usps", "--method", "ncd", "--known-classes", known, "--out", out], message)
    assert not out.exists()


@pytest.mark.assets
def test_cli_teacher_and_student_must_share_a_base(tmp_path):
    out = tmp_path / "out"
    bad(["distill", "--data", "opencv-digits", "--per-class", "10", "--teacher", "digits-mnist", "--student",
         "digits-usps", "--method", "ncd", "--out", out], "from one base model")
    assert not out.exists()


@pytest.mark.assets
def test_discovers_novel_digits_end_to_end(tmp_path):
    """Real digits (OpenCV's), the USPS CNN: 0–4 known, 5–9 novel; through the CLI into a run folder."""
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 4\npretrain_epochs: 4\nbatch_size: 128\n")
    ok(["distill", "--data", "opencv-digits", "--per-class", "80", "--teacher", "digits-usps", "--student",
        "digits-usps", "--method", "ncd", "--known-classes", "0,1,2,3,4", "--config", cfg, "--out", out])
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_test_novel"] == 80 and m["n_train_novel"] == 320 and m["n_train_known"] == 320
    assert m["known_test_accuracy"] > 0.8
    assert m["novel_cluster_accuracy"] > 0.4  # chance (five balanced clusters) is about 0.2–0.3
    assert 0 < m["test_accuracy"] <= 1
    assert (out / "delta" / "delta.json").is_file() and (out / "split.json").is_file()
    meta = json.loads((out / "delta" / "delta.json").read_text())["meta"]
    assert meta["method"] == "distill:ncd" and meta["options"]["known_classes"] == CLASSES[:5]
