"""features: streamed extraction, taps, source probabilities, and the on-disk cache."""

import numpy as np
import pytest
import torch
from torch import nn

from transferkit import features as F
from transferkit.data import Dataset
from transferkit.errors import DataError, ModelError
from transferkit.zoo.base import ImagePreprocess, ZooModel


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 6)
        self.calls = []

    def forward(self, x):
        self.calls.append(len(x))
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _model():
    torch.manual_seed(0)
    bb = _Backbone()
    return ZooModel("toy-cnn", "image", bb, nn.Linear(6, 3), 6, ImagePreprocess(8, [0.5], [0.5], channels=1),
                    {"size": 8}, meta={"fingerprint": "toy-cnn-v1"})


def _data(n=50):
    rng = np.random.default_rng(0)
    return Dataset("toy", "image", rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), np.arange(n) % 3, ["a", "b", "c"])


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path))


def test_streamed_extraction_matches_one_batch_and_caches():
    m, ds = _model(), _data()
    f = F.extract(m, ds, batch_size=16, progress=False)
    assert m.backbone.calls == [16, 16, 16, 2]  # streamed, never the whole set at once
    with torch.no_grad():
        x = m.preprocess(ds.X)
        full = m.backbone(x)
        probs = torch.softmax(m.head(full), -1)
    np.testing.assert_allclose(f.X, full.numpy(), atol=1e-5)
    np.testing.assert_allclose(f.probs, probs.numpy(), atol=1e-6)
    np.testing.assert_array_equal(f.y, ds.y)
    m.backbone.calls.clear()
    g = F.extract(m, ds, batch_size=16, progress=False)
    assert m.backbone.calls == []  # cache hit: no forward pass
    np.testing.assert_array_equal(g.X, f.X)
    assert g.fingerprint == f.fingerprint


def test_cache_key_changes_with_data_tap_and_preprocessing():
    m, ds = _model(), _data()
    F.extract(m, ds, progress=False)
    m.backbone.calls.clear()
    F.extract(m, ds.subset(np.arange(10)), progress=False)
    assert m.backbone.calls, "different data must miss the cache"
    m.backbone.calls.clear()
    t = F.extract(m, ds, tap="conv", progress=False)
    assert m.backbone.calls and t.X.shape == (50, 4)  # conv tap pooled over space
    m.preprocessing = {"size": 16}
    m.backbone.calls.clear()
    F.extract(m, ds, progress=False)
    assert m.backbone.calls, "different preprocessing must miss the cache"


def test_tap_features_are_pooled_conv_outputs():
    m, ds = _model(), _data(10)
    t = F.extract(m, ds, tap="conv", cache=False, progress=False)
    with torch.no_grad():
        ref = m.backbone.conv(m.preprocess(ds.X)).mean(dim=(2, 3))
    np.testing.assert_allclose(t.X, ref.numpy(), atol=1e-5)
    with pytest.raises(ModelError, match="unknown tap"):
        F.extract(m, ds, tap="nope", cache=False, progress=False)


def test_modality_mismatch_and_bad_features():
    m = _model()
    text = Dataset("t", "text", ["a", "b"], np.array([0, 1]), ["x", "y"])
    with pytest.raises(DataError, match="takes image inputs"):
        F.extract(m, text, progress=False)
    with pytest.raises(DataError, match="NaN or inf"):
        F.Features(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(DataError, match="rows but labels"):
        F.Features(np.zeros((3, 2)), np.array([0, 1]))


def test_half_written_cache_entry_is_not_trusted(tmp_path):
    m, ds = _model(), _data()
    f = F.extract(m, ds, progress=False)
    path = F.cache_path(f.fingerprint, m.name)
    (path / "features.json").unlink()  # as if killed before the marker landed
    m.backbone.calls.clear()
    F.extract(m, ds, progress=False)
    assert m.backbone.calls


def test_retrained_model_under_the_same_name_misses_the_cache():
    m, ds = _model(), _data()
    del m.meta["fingerprint"]  # not a catalogue model: the weights themselves are the identity
    F.extract(m, ds, progress=False)
    again = _model()
    del again.meta["fingerprint"]
    again.backbone.calls.clear()
    F.extract(again, ds, progress=False)
    assert again.backbone.calls == [], "same weights, same name: cache hit"
    with torch.no_grad():
        again.backbone.fc.bias.add_(1.0)
    retrained = ZooModel("toy-cnn", "image", again.backbone, again.head, 6, again.preprocess, {"size": 8})
    F.extract(retrained, ds, progress=False)
    assert again.backbone.calls, "changed weights under the same name must miss the cache"


# --------------------------------------------------------------------------- several taps, unlabelled rows


def test_several_taps_in_one_pass_equal_single_tap_extraction():
    m, ds = _model(), _data()
    taps = ["conv", "penultimate", "fc"]
    many = F.extract(m, ds, tap=taps, batch_size=16, cache=False, progress=False)
    assert list(many) == taps
    assert m.backbone.calls == [16, 16, 16, 2]  # one backbone call per batch for all three taps
    for t in taps:
        one = F.extract(m, ds, tap=t, batch_size=16, cache=False, progress=False)
        np.testing.assert_array_equal(many[t].X, one.X)  # bit-identical to the single-tap path
        np.testing.assert_array_equal(many[t].probs, one.probs)
        assert many[t].fingerprint == one.fingerprint == F.fingerprint(m, ds, t)
    np.testing.assert_array_equal(many["fc"].X, many["penultimate"].X)  # fc is the backbone's output
    with pytest.raises(ModelError, match="unknown tap 'nope'"):
        F.extract(m, ds, tap=["conv", "nope"], cache=False, progress=False)
    with pytest.raises(ModelError, match="non-empty list"):
        F.extract(m, ds, tap=[], cache=False, progress=False)


def test_several_taps_are_cached_per_tap():
    m, ds = _model(), _data()
    single = F.extract(m, ds, tap="conv", batch_size=16, progress=False)  # "conv" now cached
    m.backbone.calls.clear()
    many = F.extract(m, ds, tap=["conv", "penultimate"], batch_size=16, progress=False)
    assert m.backbone.calls == [16, 16, 16, 2]  # only the missing tap is read, still in one pass
    np.testing.assert_array_equal(many["conv"].X, single.X)
    m.backbone.calls.clear()
    again = F.extract(m, ds, tap=["penultimate", "conv"], batch_size=16, progress=False)
    assert m.backbone.calls == []  # a cache hit for every tap
    assert list(again) == ["penultimate", "conv"]
    np.testing.assert_array_equal(again["penultimate"].X, many["penultimate"].X)
    m.backbone.calls.clear()
    alone = F.extract(m, ds, progress=False)  # the tap written by the multi-tap call serves a single call
    assert m.backbone.calls == [] and np.array_equal(alone.X, many["penultimate"].X)


def test_unlabelled_rows_and_domains_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    f = F.Features(rng.normal(size=(5, 3)), np.array([0, -1, 2, -1, 1]), domains=np.array([0, 1, 1, 0, 2]),
                   fingerprint={"tap": "x"})
    assert f.labelled.tolist() == [True, False, True, False, True] and f.n_classes == 3
    g = F.load(F.save(f, tmp_path / "f"))
    np.testing.assert_array_equal(g.X, f.X)
    assert g.y.tolist() == f.y.tolist() and g.domains.tolist() == f.domains.tolist() and g.fingerprint == f.fingerprint
    stream = F.Features(np.zeros((4, 2)))  # no labels at all
    assert stream.y.tolist() == [-1] * 4 and stream.n_classes == 0
    assert F.load(F.save(stream, tmp_path / "s")).y.tolist() == [-1] * 4
    sub = f.subset(np.array([1, 2]))
    assert sub.y.tolist() == [-1, 2] and sub.domains.tolist() == [1, 1]
    with pytest.raises(DataError, match="-1 for an unlabelled row"):
        F.Features(np.zeros((2, 2)), np.array([0, -2]))
    with pytest.raises(DataError, match="domain ids must be integers"):
        F.Features(np.zeros((2, 2)), np.array([0, 1]), domains=np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="domain ids must be ≥ 0"):
        F.Features(np.zeros((2, 2)), np.array([0, 1]), domains=np.array([0, -1]))
    with pytest.raises(DataError, match="NaN or inf"):
        F.Features(np.array([[np.inf, 0.0]]))
    with pytest.raises(DataError, match="2-D"):
        F.Features(np.zeros(3))


def test_extract_unlabelled_dataset_keys_on_labels_and_domains():
    m, ds = _model(), _data(20)
    unl = Dataset("toy", "image", ds.X, np.full(20, -1), ds.classes, domains=np.arange(20) % 2, domain_names=["p", "q"])
    a = F.extract(m, ds, progress=False)
    m.backbone.calls.clear()
    b = F.extract(m, unl, progress=False)
    assert m.backbone.calls, "other labels/domains: another cache entry"
    np.testing.assert_array_equal(a.X, b.X)  # same images, same features
    assert b.y.tolist() == [-1] * 20 and b.domains.tolist() == unl.domains.tolist()
    assert a.fingerprint["data"] != b.fingerprint["data"]
    m.backbone.calls.clear()
    c = F.extract(m, unl, progress=False)
    assert m.backbone.calls == [] and c.y.tolist() == [-1] * 20 and c.domains.tolist() == unl.domains.tolist()
