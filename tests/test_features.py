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
