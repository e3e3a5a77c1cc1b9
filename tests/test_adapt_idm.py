"""IDM, informative data mining (transferkit.adapt.idm): the entropy ranking against scipy, the mined items come
from the unlabelled target training part only, the patch mix's label share against the pixels it moved,
prototype labels against a naive loop, a real digit shift against source-only, determinism, one-line errors."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy as scipy_entropy

from transferkit.adapt import adapt
from transferkit.adapt._common import classifier, match_images, predict_logits
from transferkit.adapt.idm import cutmix, informativeness, mine, prototype_labels
from transferkit.errors import ConfigError

FAST = {"source_epochs": 0, "epochs": 1, "budget": 50}  # the USPS CNN's own head is the source model


@pytest.fixture(scope="module")
def shift():
    from transferkit.data import load_dataset
    from transferkit.data.split import make_split
    from transferkit.zoo import load_model

    model = load_model("digits-usps")
    source = load_dataset("mnist", limit=500, seed=0)
    train, test, _ = make_split("opencv-digits", limit=500, sample_seed=0, seed=0, test_size=0.3)
    return model, source, train, test


def test_ranking_is_the_prediction_entropy_computed_a_second_way(shift):
    model, source, train, _ = shift
    clf = classifier(model, source.classes, 0)
    scores = informativeness(clf, train.X, model.preprocess)
    logits = predict_logits(clf, train.X[:37], model.preprocess, batch_size=5).double().numpy()  # other batches
    np.testing.assert_allclose(scores[:37], scipy_entropy(softmax(logits, axis=1), axis=1), rtol=1e-5, atol=1e-6)
    top = mine(scores, 20)
    naive = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:20]
    assert top.tolist() == sorted(naive)
    assert scores[top].min() >= np.delete(scores, top).max()
    assert mine(scores, 10 ** 6).tolist() == list(range(len(scores)))  # a budget beyond the set takes all
    rand = mine(scores, 20, "random", seed=3)
    assert len(set(rand.tolist())) == 20 and rand.tolist() == mine(scores, 20, "random", seed=3).tolist()


def test_mined_items_are_the_most_uncertain_training_items_and_labels_are_never_read(shift):
    model, source, train, test = shift
    res = adapt(model, source, train, test, method="idm", options=FAST, seed=0)
    chosen = np.asarray(res.metrics["chosen"])
    assert len(chosen) == 50 and chosen.min() >= 0 and chosen.max() < len(train)
    _, seen_train, _ = match_images(model, source, train, test)  # adapt() brings the sets to one image size
    expected = mine(informativeness(classifier(model, source.classes, 0), seen_train.X, model.preprocess), 50)
    np.testing.assert_array_equal(chosen, expected)
    shuffled = replace(train, y=np.random.default_rng(0).permutation(train.y))  # other target labels: same run
    again = adapt(model, source, shuffled, test, method="idm", options=FAST, seed=0)
    assert again.metrics["chosen"] == res.metrics["chosen"]
    np.testing.assert_array_equal(again.predictions["adapted"], res.predictions["adapted"])  # determinism too


def test_adapting_on_mined_items_beats_source_only_on_a_real_shift(shift):
    model, source, train, test = shift
    m = adapt(model, source, train, test, method="idm", options=FAST, seed=0).metrics
    assert m["accuracy"] > m["source_only_accuracy"] + 0.05  # measured 0.84 vs 0.68
    assert m["mined_entropy"] > m["target_entropy"]


def test_patch_mix_label_share_is_the_share_of_source_pixels():
    torch.manual_seed(0)
    xs, xt = torch.zeros(64, 2, 9, 7), torch.ones(64, 2, 9, 7)
    mixed, keep = cutmix(xs, xt)
    np.testing.assert_allclose(keep.numpy(), 1 - mixed.mean(dim=(1, 2, 3)).numpy(), atol=1e-6)
    assert ((mixed == 0) | (mixed == 1)).all() and 0.0 < keep.mean() < 1.0
    assert torch.equal((mixed[:, 0] == 1), (mixed[:, 1] == 1))  # one box across channels


def test_prototype_labels_match_a_naive_loop():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(40, 6))
    p = softmax(rng.normal(size=(40, 3)) * 2, axis=1)
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    w = p
    for _ in range(2):
        protos = []
        for c in range(3):
            m = sum(w[i, c] * u[i] for i in range(40)) / max(w[:, c].sum(), 1e-12)
            protos.append(m / np.linalg.norm(m))
        labels = np.array([int(np.argmax([u[i] @ q for q in protos])) for i in range(40)])
        w = np.eye(3)[labels]
    np.testing.assert_array_equal(prototype_labels(torch.tensor(f), torch.tensor(p)), labels)


def test_bad_options_and_text_models_are_one_line_errors(shift):
    model, source, train, test = shift
    with pytest.raises(ConfigError, match="budget") as e:
        adapt(model, source, train, test, method="idm", options={"budget": 0})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="choices|one of"):
        adapt(model, source, train, test, method="idm", options={"select": "margin"})
    text = replace(model, modality="text")
    with pytest.raises(ConfigError, match="supports image"):
        adapt(text, source, train, test, method="idm")
