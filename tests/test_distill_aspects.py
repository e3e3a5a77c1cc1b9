"""distill: multi-aspect KD (Lee et al., CVPRW'25) — CE + λ·BCE by hand, the calibration, the top-N aspect
choice, cached answers == a recomputation with the model, end-to-end runs on real images and real text (the
saved student loads as a teacher), and bad input as one-line errors."""

import math

import numpy as np
import pytest
import torch

from transferkit.distill import distill, load_net
from transferkit.distill.aspects import (AspectClassifier, AspectOptions, aspect_loss, aspect_targets, calibrate,
                                         raw_answers)
from transferkit.errors import ConfigError


# ---------------------------------------------------------------------------------------- the loss
def test_loss_is_ce_on_classes_plus_weighted_bce_on_aspects_by_hand():
    z = torch.tensor([[2.0, -1.0, 0.5, 0.3, -2.0], [0.0, 1.0, -0.5, 1.5, 0.2]])
    y = torch.tensor([0, 2])
    a = torch.tensor([[0.9, 0.1], [0.25, 0.5]])
    total, ce, bce = aspect_loss(z, y, a, n_classes=3, weight=0.7)
    ce_hand = 0.0
    for row, label in zip(z.tolist(), y.tolist()):
        ce_hand -= row[label] - math.log(sum(math.exp(v) for v in row[:3]))
    ce_hand /= 2
    bce_hand = 0.0
    for row, targets in zip(z.tolist(), a.tolist()):
        for logit, t in zip(row[3:], targets):
            p = 1 / (1 + math.exp(-logit))
            bce_hand -= t * math.log(p) + (1 - t) * math.log(1 - p)
    bce_hand /= 4
    assert float(ce) == pytest.approx(ce_hand, rel=1e-6) and float(bce) == pytest.approx(bce_hand, rel=1e-6)
    assert float(total) == pytest.approx(ce_hand + 0.7 * bce_hand, rel=1e-6)


def test_calibration_is_a_per_aspect_z_score_through_a_sigmoid():
    s = torch.tensor([[1.0, 5.0, 3.0], [3.0, 5.0, 3.0], [5.0, 5.0, 9.0]])
    a = calibrate(s)
    col = np.array([1.0, 3.0, 5.0])
    z = (col - col.mean()) / col.std()
    assert np.allclose(a[:, 0].numpy(), 1 / (1 + np.exp(-z)), atol=1e-6)
    assert torch.all(a[:, 1] == 0.5)  # a constant aspect answers 0.5
    assert a[2, 2] > 0.5 > a[0, 2] and a[0, 2] == a[1, 2]


def test_student_forward_gives_class_logits_and_classifier_keeps_their_rows():
    m = AspectClassifier(torch.nn.Linear(4, 6), 6, 3, 5, seed=0)
    x = torch.randn(2, 4)
    assert m.full(x).shape == (2, 8) and torch.equal(m(x), m.full(x)[:, :3])
    assert torch.equal(m.classifier()(x), m(x))


# ---------------------------------------------------------------------------------------- the answers
@pytest.fixture(scope="module")
def digits():
    from transferkit.data.split import make_split

    train, test, split = make_split("sklearn-digits", limit=200, seed=0)
    return train, test, split


@pytest.mark.assets
def test_image_answers_cached_equal_a_recomputation_and_are_the_top_n_classes(digits):
    from transferkit.zoo import load_model

    train = digits[0]
    zoo = load_model("digits-usps")  # its source head: 10 digit classes
    opts = AspectOptions(n_aspects=4)
    first, names = aspect_targets(zoo, train, opts)
    again, names2 = aspect_targets(zoo, train, opts)  # from the features cache
    assert torch.equal(first, again) and names == names2
    with torch.no_grad():  # recomputation item by item, straight through the model
        logits = torch.cat([zoo.head(zoo.backbone(zoo.preprocess(train.X[i: i + 1]))) for i in range(len(train))])
    logp = torch.log_softmax(logits.double(), -1)
    top = np.argsort(-logp.exp().mean(0).numpy(), kind="stable")[:4]
    assert names == [f"digits-usps:{zoo.source_classes[k]}" for k in top]
    assert torch.allclose(first, calibrate(logp[:, top]), atol=1e-4)
    assert first.shape == (len(train), 4) and abs(float((first > 0.5).float().mean()) - 0.5) < 0.2


@pytest.mark.assets
def test_text_answers_are_cosines_to_the_statements(tmp_path):
    import torch.nn.functional as F

    from transferkit.data import make_dataset
    from transferkit.zoo import load_model

    texts = ["I loved this film, wonderful acting", "terrible food, cold and bland", "what time is it?",
             "the election results were announced", "lol that was hilarious"]
    ds = make_dataset("tiny-text", texts, [0, 1, 0, 1, 0], classes=["a", "b"])
    zoo = load_model("all-minilm-l6-v2")
    opts = AspectOptions(aspects=["This text is about food.", "This text is about politics."])
    scores, names = raw_answers(zoo, ds, opts)
    with torch.no_grad():
        e = F.normalize(zoo.backbone(zoo.preprocess(texts)), dim=-1)
        p = F.normalize(zoo.backbone(zoo.preprocess(opts.aspects)), dim=-1)
    assert names == opts.aspects and torch.allclose(scores, e @ p.T, atol=1e-4)
    assert int(scores[:, 0].argmax()) == 1 and int(scores[:, 1].argmax()) == 3  # food, politics


# ---------------------------------------------------------------------------------------- end to end
@pytest.mark.assets
def test_image_run_end_to_end_and_the_student_loads_as_a_teacher(digits, tmp_path):
    from transferkit.zoo import Classifier

    train, test, split = digits
    out = tmp_path / "run"
    res = distill(["digits-usps"], "digits-mnist", train, test, method="aspects",
                  config={"epochs": 5, "lr": 3e-3, "n_aspects": 5, "seed": 0}, out_dir=out, split=split)
    m = res.metrics
    assert m["answerer"] == "digits-usps" and len(m["aspects"]) == 5 and 0.3 <= m["aspect_positive_rate"] <= 0.7
    assert type(res.student) is Classifier and res.student.head.out_features == 10
    assert m["test_accuracy"] > 0.3  # ten classes: chance is 0.1
    net = load_net(str(out), list(train.classes))  # the run folder loads like a tune run
    from transferkit.distill._common import accuracy

    assert accuracy(net.module, net, test) == pytest.approx(m["test_accuracy"])


@pytest.mark.assets
@pytest.mark.slow
def test_text_run_end_to_end():
    from transferkit.data.split import make_split

    train, test, _ = make_split("vader:movies", limit=80, seed=0)
    res = distill(["all-minilm-l6-v2"], "paraphrase-minilm-l3-v2", train, test, method="aspects",
                  config={"epochs": 1, "batch_size": 16, "seed": 0})
    assert len(res.metrics["aspects"]) == 10 and 0 <= res.metrics["test_accuracy"] <= 1


# ---------------------------------------------------------------------------------------- bad input
def test_bad_options_are_one_line_config_errors():
    from transferkit.distill._common import split_config

    with pytest.raises(ConfigError, match="aspect_weight"):
        split_config("aspects", {"aspect_weight": -1.0})
    with pytest.raises(ConfigError, match="n_aspects"):
        split_config("aspects", {"n_aspects": 0})
    with pytest.raises(ConfigError, match="non-empty"):
        split_config("aspects", {"aspects": []})


@pytest.mark.assets
@pytest.mark.parametrize("teachers, config, message", [
    (["digits-usps"], {"n_aspects": 11}, "has 10 source classes"),
    (["digits-usps"], {"aspects": ["round"]}, "are for text data"),
    (["digits-usps", "digits-mnist"], {}, "one answerer"),
])
def test_bad_answerers_are_refused(digits, teachers, config, message):
    train, test, _ = digits
    with pytest.raises(ConfigError, match=message):
        distill(teachers, "digits-mnist", train, test, method="aspects", config=config)


def test_cli_bad_option_exits_2_and_writes_nothing(tmp_path):
    from _cli import bad

    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_aspect: 3\n")
    out = tmp_path / "out"
    bad(["distill", "--method", "aspects", "--data", "sklearn-digits", "--teacher", "mobilenet-v2", "--student",
         "digits-usps", "--config", cfg, "--out", out], "did you mean 'n_aspects'")
    assert not out.exists()


@pytest.mark.assets
def test_cli_run_writes_the_run_folder(tmp_path):
    import json

    from _cli import ok

    out = tmp_path / "out"
    ok(["distill", "--data", "sklearn-digits", "--teacher", "digits-usps", "--student", "digits-mnist", "--method",
        "aspects", "--limit", "100", "--epochs", "1", "--out", out])
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "aspects" and len(m["aspects"]) == 10 and (out / "delta").is_dir()


@pytest.mark.assets
@pytest.mark.slow
def test_pipeline_stage_runs_aspects(tmp_path):
    from transferkit.pipeline import run_pipeline

    cfg = {"name": "d", "targets": [{"data": "sklearn-digits", "limit": 300}], "models": ["digits-usps"],
           "metrics": ["logme"], "tune": {"method": "full", "top_k": 1, "config": {"epochs": 1}},
           "distill": {"student": "digits-svhn", "method": "aspects", "config": {"epochs": 1}}, "seeds": [0]}
    s = run_pipeline(cfg, tmp_path / "run", progress=False)
    run = s["distill"]["runs"]["sklearn-digits"]
    assert 0 <= run["accuracy"] <= 1 and (tmp_path / "run" / run["dir"] / "metrics.json").is_file()
