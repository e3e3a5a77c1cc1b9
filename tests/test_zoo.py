"""Fast zoo tests: no downloads. Tiny modules, synthetic weight files and a tiny HF directory."""

from __future__ import annotations

import json
import re
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from transferkit import assets
from transferkit.errors import ModelError
from transferkit.io import save_safetensors
from transferkit.zoo import (PENULTIMATE, Classifier, ImagePreprocess, ZooModel, from_module, list_models,
                             load_model, model_names)
from transferkit.zoo import archs, loaders

NAMES = ["all-minilm-l6-v2", "paraphrase-minilm-l3-v2", "all-mpnet-base-v2", "mobilenet-v2", "efficientnet-lite0",
         "efficientnet-lite1", "efficientnet-lite2", "digits-mnist", "digits-usps", "digits-svhn"]


class TinyCNN(nn.Module):
    def __init__(self, n_classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
        self.fc = nn.Linear(6, n_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.fixture
def bert_dir(tiny_bert_dir):
    """The shared tiny BERT directory (tests/conftest.py)."""
    return tiny_bert_dir


def _images(n=5, size=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- catalogue


def test_catalogue_has_the_ten_models_with_complete_entries():
    assert model_names() == NAMES
    rows = {r["name"]: r for r in list_models()}
    assert list(rows) == NAMES
    for name, row in rows.items():
        assert set(row) >= {"name", "modality", "params", "source", "hub_id", "licence", "cached"}
        assert isinstance(row["cached"], bool) and row["params"] > 0
        e = assets.entry(name, "model")
        assert e["loader"] in loaders.LOADERS
        for src in e["sources"]:
            assert src["registry"] == "pypi" and re.fullmatch(r"[0-9a-f]{64}", src["sha256"])
        for spec in e["files"].values():
            assert re.fullmatch(r"[0-9a-f]{64}", spec.get("sha256", "0" * 64))
        if e["modality"] == "image":
            o = e["options"]
            assert len(o["mean"]) == len(o["std"]) == o["channels"] and o["size"] > 0
            assert e["classes"]
    assert assets.entry("digits-mnist")["options"]["channels"] == 1
    assert assets.entry("digits-svhn")["options"]["channels"] == 3
    assert [assets.entry(f"efficientnet-lite{i}")["options"]["size"] for i in range(3)] == [224, 240, 260]


@pytest.mark.parametrize("arch,name", [("mobilenet-v2", "mobilenet-v2"), ("lite0", "efficientnet-lite0"),
                                       ("lite1", "efficientnet-lite1"), ("lite2", "efficientnet-lite2"),
                                       ("mnist", "digits-mnist"), ("usps", "digits-usps"), ("svhn", "digits-svhn")])
def test_architectures_have_the_published_parameter_counts(arch, name):
    net = archs.build(arch)
    assert sum(p.numel() for p in net.parameters()) == assets.entry(name)["params"]
    backbone, head = archs.split_head(net, net.head_path)
    assert isinstance(head, nn.Linear)
    size = assets.entry(name)["options"]["size"]
    channels = assets.entry(name)["options"]["channels"]
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(2, channels, size, size))
    assert out.shape == (2, head.in_features)


def test_tf_same_padding_matches_tensorflow_output_sizes():
    conv = archs.SameConv2d(3, 4, 3, stride=2)
    assert conv(torch.zeros(1, 3, 224, 224)).shape[-2:] == (112, 112)
    assert conv(torch.zeros(1, 3, 225, 225)).shape[-2:] == (113, 113)
    conv5 = archs.SameConv2d(4, 4, 5, stride=2, groups=4)
    assert conv5(torch.zeros(1, 4, 15, 15)).shape[-2:] == (8, 8)


def test_digit_net_rejects_wrong_input_size_with_model_error():
    with pytest.raises(ModelError, match="expects"):
        archs.MNISTNet(28)(torch.zeros(1, 1, 16, 16))


# ----------------------------------------------------------------------------- from_module, taps, preprocess


def test_from_module_with_named_head_taps_and_probs(tmp_path):
    torch.manual_seed(0)
    net = TinyCNN()
    ref = net.eval()(ImagePreprocess(16, [0.5] * 3, [0.25] * 3)(_images())).detach()
    path = save_safetensors(net.state_dict(), tmp_path / "tiny.safetensors")
    m = from_module(TinyCNN(), path, modality="image", head="fc",
                    preprocess={"size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "channels": 3}, name="tiny")
    assert isinstance(m, ZooModel) and m.feature_dim == 6 and m.source_classes == ["0", "1", "2", "3"]
    x = m.preprocess(_images())
    assert x.shape == (5, 3, 16, 16)
    feats = m.features(x)
    assert feats.shape == (5, 6)
    assert torch.allclose(m.head(feats), ref, atol=1e-6)  # strict load reproduced the weights
    probs = m.source_probs(feats)
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    assert m.taps()[0] == PENULTIMATE and "features.1" in m.taps()
    assert m.features(x, tap="features.1").shape == (5, 8)  # conv map pooled over space
    with pytest.raises(ModelError, match="unknown tap"):
        m.features(x, tap="nope")
    assert m.preprocessing["size"] == 16 and m.n_params() == sum(p.numel() for p in net.parameters())


def test_from_module_infers_feature_dim_by_probing_and_accepts_head_module():
    body = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    m = from_module(body, modality="image", preprocess=ImagePreprocess(10, [0.0] * 3, [1.0] * 3))
    assert m.feature_dim == 5 and m.head is None and m.source_probs(torch.zeros(1, 5)) is None
    m2 = from_module(nn.Linear(7, 3), modality="image", head=nn.Linear(3, 2))
    assert m2.feature_dim == 3 and m2.preprocessing == {"kind": "tensor"}
    assert m2.features(m2.preprocess(np.ones((4, 7), dtype=np.float32))).shape == (4, 3)
    with pytest.raises(ModelError, match="feature_dim"):
        from_module(nn.Linear(7, 3), modality="text", preprocess=lambda t: t)
    with pytest.raises(ModelError, match="modality"):
        from_module(nn.Linear(7, 3), modality="audio")
    with pytest.raises(ModelError, match="no submodule"):
        from_module(TinyCNN(), modality="image", head="classifier", feature_dim=6)


def test_image_preprocess_shapes_and_normalisation():
    prep = ImagePreprocess(8, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], channels=3)
    grey = np.full((2, 5, 5), 255, dtype=np.uint8)
    x = prep(grey)
    assert x.shape == (2, 3, 8, 8)
    expect = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[0, :, 3, 3], expect, atol=1e-5)
    one = ImagePreprocess(4, [0.1307], [0.3081], channels=1)
    y = one(np.zeros((3, 4, 4, 3), dtype=np.uint8))
    assert y.shape == (3, 1, 4, 4) and torch.allclose(y, torch.full_like(y, -0.1307 / 0.3081))
    ro = np.zeros((1, 4, 4), dtype=np.uint8)
    ro.setflags(write=False)  # PIL-backed arrays are read-only
    assert one(ro).shape == (1, 1, 4, 4)


def test_classifier_forward_and_seeded_head():
    m = from_module(TinyCNN(), modality="image", head="fc", preprocess={"size": 8, "mean": [0.5] * 3,
                                                                        "std": [0.5] * 3})
    c1, c2 = m.classifier(3, seed=1), m.classifier(3, seed=1)
    assert isinstance(c1, Classifier)
    x = m.preprocess(_images(4))
    assert c1(x).shape == (4, 3)
    assert torch.equal(c1.head.weight, c2.head.weight)


# ----------------------------------------------------------------------------- bad weight files


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_corrupt_and_truncated_weights_raise_one_line_model_error(tmp_path):
    good = save_safetensors(TinyCNN().state_dict(), tmp_path / "good.safetensors")
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file" * 10)
    pth = tmp_path / "model.pth"
    torch.save(TinyCNN().state_dict(), pth)
    tpth = tmp_path / "trunc.pth"
    tpth.write_bytes(pth.read_bytes()[:200])
    for bad in (trunc, junk, tpth, tmp_path / "missing.safetensors"):
        with pytest.raises(ModelError) as exc:
            from_module(TinyCNN(), bad, modality="image", head="fc")
        _one_line(exc)
    # a readable file with the wrong layout
    with pytest.raises(ModelError, match="do not fit") as exc:
        from_module(TinyCNN(n_classes=7), good, modality="image", head="fc")
    assert "shape" in _one_line(exc)
    other = save_safetensors({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelError, match="missing keys") as exc:
        from_module(TinyCNN(), other, modality="image", head="fc")
    _one_line(exc)


def test_digit_cnn_loads_a_pth_strictly(tmp_path):
    torch.manual_seed(0)
    net = archs.USPSNet(16)
    pth = tmp_path / "usps.pth"
    torch.save(net.state_dict(), pth)
    m = from_module(archs.USPSNet(16), pth, modality="image", head=archs.USPSNet.head_path,
                    preprocess={"size": 16, "mean": [0.2471], "std": [0.2994], "channels": 1})
    x = m.preprocess(np.zeros((2, 20, 20), dtype=np.uint8))
    assert torch.allclose(m.head(m.features(x)), net.eval()(x), atol=1e-6)


# ----------------------------------------------------------------------------- model specs


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelError) as exc:
        load_model("resnet-9000")
    msg = _one_line(exc)
    assert "resnet-9000" in msg and all(n in msg for n in NAMES)
    with pytest.raises(ModelError, match="hf:ID"):
        load_model("someorg/somemodel")
    with pytest.raises(ModelError):
        load_model("")


def test_hf_id_offline_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not reachable") as exc:
        load_model("hf:transferkit-test/no-such-model")
    _one_line(exc)


def test_timm_spec_without_timm_says_how_to_install():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match=r"pip install transferkit\[timm\]"):
            load_model("timm:mobilenetv2_100")
    else:
        pytest.skip("timm is installed")


def test_local_hf_directory_loads_as_text_model(bert_dir):
    m = load_model(str(bert_dir))
    assert m.modality == "text" and m.head is None and m.feature_dim == 32
    batch = m.preprocess(["good movie", "the food was very very bad not good"])
    assert set(batch) >= {"input_ids", "attention_mask"}
    assert (batch["input_ids"] != 1).all()  # every word is in the vocabulary: no [UNK]
    f = m.features(batch)
    assert f.shape == (2, 32) and torch.isfinite(f).all()
    alone = m.features(m.preprocess(["good movie"]))
    assert torch.allclose(alone[0], f[0], atol=1e-5)  # masked mean ignores padding
    assert "model.encoder.layer.0" in m.taps()
    assert m.features(batch, tap="model.encoder.layer.0").shape == (2, 32)
    assert m.classifier(2)(batch).shape == (2, 2)
    assert m.preprocessing["vocab_size"] == 17


def test_hf_directory_with_custom_code_is_refused_without_trust_remote_code(bert_dir, tmp_path):
    import shutil

    d = tmp_path / "custom"
    shutil.copytree(bert_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="tk-custom", auto_map={"AutoConfig": "configuration_tk.TkConfig",
                                                 "AutoModel": "modeling_tk.TkModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "executed"
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    (d / "configuration_tk.py").write_text(code)
    (d / "modeling_tk.py").write_text(code)
    with pytest.raises(ModelError, match="trust_remote_code") as exc:
        load_model(str(d))
    _one_line(exc)
    assert not marker.exists()


def test_hf_directory_with_corrupt_weights_is_a_model_error(bert_dir, tmp_path):
    import shutil

    d = tmp_path / "corrupt"
    shutil.copytree(bert_dir, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ModelError) as exc:
        load_model(str(d))
    _one_line(exc)
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))


def test_split_zip_loader_joins_parts_once_atomically(bert_dir, tmp_path, monkeypatch):
    """The MPNet path: a HF directory zipped, split in parts, joined and unpacked under derived_dir."""
    zpath = tmp_path / "whole.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(bert_dir.iterdir()):
            zf.write(f, f"tiny/{f.name}")
        zf.writestr("tiny/desktop.ini", "junk")
    data = zpath.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = {}
    for i in range(3):
        p = tmp_path / f"whole.zip.00{i + 1}"
        p.write_bytes(data[cut[i]:cut[i + 1]])
        parts[f"part{i + 1}"] = p
    calls = []

    def fake_asset_file(name, key):
        calls.append(key)
        return parts[key]

    monkeypatch.setattr(assets, "asset_file", fake_asset_file)
    monkeypatch.setattr(assets, "derived_dir", lambda name: tmp_path / "derived" / name)
    entry = {"params": 1, "sources": []}
    opts = {"parts": ["part1", "part2", "part3"], "max_length": 16}
    m = loaders._load_split_zip_sentence("tiny-split", entry, opts)
    assert m.feature_dim == 32 and calls == ["part1", "part2", "part3"]
    out = tmp_path / "derived" / "tiny-split" / "model"
    assert (out / "tiny" / "config.json").is_file()
    assert not list(out.glob("**/desktop.ini")) and not list(out.glob("**/*.zip"))
    m2 = loaders._load_split_zip_sentence("tiny-split", entry, opts)  # cached: parts not read again
    assert calls == ["part1", "part2", "part3"] and m2.feature_dim == 32
