"""The shared types together: a multi-domain Dataset through Features, a mask Delta at the merge door."""

import numpy as np
import pytest
import torch
from torch import nn

from transferkit import features as F
from transferkit.data import combine_domains, make_dataset
from transferkit.data.dataset import split_mask
from transferkit.delta import Delta, apply, as_additive, from_states, to_dense
from transferkit.errors import ModelError
from transferkit.zoo.base import ImagePreprocess, ZooModel


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path))


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _model():
    torch.manual_seed(0)
    return ZooModel("toy", "image", _Backbone(), nn.Linear(5, 2), 5, ImagePreprocess(8, [0.5], [0.5], channels=1),
                    {"size": 8}, meta={"fingerprint": "toy-v1"})


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8), dtype=np.uint8)


def test_source_plus_target_features_restrict_to_the_source_features():
    src = make_dataset("src", _images(12, 0), np.arange(12) % 2)
    tgt = make_dataset("tgt", _images(7, 1))  # unlabelled target domain
    both = combine_domains(src, tgt)
    m = _model()
    feats = F.extract(m, both, tap=["conv", "penultimate"], batch_size=5, progress=False)
    assert m.backbone.calls == 4  # ceil(19 / 5) batches, one pass for both taps
    for tap, f in feats.items():
        assert f.y.tolist() == src.y.tolist() + [-1] * 7 and f.domains.tolist() == [0] * 12 + [1] * 7
        alone = F.extract(m, src, tap=tap, batch_size=5, cache=False, progress=False)
        # the labelled rows are the source's features; per-row results do not depend on the batch mates
        np.testing.assert_allclose(f.subset(f.labelled).X, alone.X, rtol=1e-6, atol=1e-6)
        assert f.subset(f.domains == 1).y.tolist() == [-1] * 7
    # a split of the combined set holds out source and target items alike
    te = split_mask(both, test_size=0.25, seed=0)
    assert 0 < int((te & both.labelled).sum()) < 12 and 0 < int((te & ~both.labelled).sum()) < 7


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_merge_methods_refuse_a_mask_delta_until_it_is_made_additive():
    from transferkit.merge import task_arithmetic, ties

    base = _net()
    gen = torch.Generator().manual_seed(0)
    mask = Delta("toy", "mask", {k: torch.rand(v.shape, generator=gen) > 0.5 for k, v in base.state_dict().items()})
    tuned = _net()
    with torch.no_grad():
        tuned[0].weight.add_(0.25)
    task = from_states(base.state_dict(), tuned.state_dict(), base_name="toy")
    for merge in (lambda ds: task_arithmetic(ds, lam=1.0), lambda ds: ties(ds, k=1.0, lam=1.0)):
        with pytest.raises(ModelError, match="as_additive"):
            merge([task, mask])
    merged = task_arithmetic([task, as_additive(mask, base)], lam=1.0)
    # base + τ + (θ⊙m − θ): the tuned change plus the pruning, reference computed by hand
    state = base.state_dict()
    expected = {k: state[k] + to_dense(task).get(k, torch.zeros_like(state[k])) - state[k] * (~mask.tensors[k])
                for k in state}
    got = apply(_net(), merged).state_dict()
    for k in state:
        torch.testing.assert_close(got[k], expected[k])

