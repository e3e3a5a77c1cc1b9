"""LT-SFT: ≤ K stored entries, entries outside the mask bitwise unchanged, Delta applies cleanly,
composition = sum of dense deltas (order-independent), masked-LM domain SFT, CLI."""

import copy
import json

import pytest
import torch
from test_tune_common import image_data, image_model, logits, text_batch, text_data, text_model
from typer.testing import CliRunner

from transferkit.delta import NEW, SPARSE_IDX, Delta, apply, to_dense
from transferkit.errors import ConfigError
from transferkit.tune import tune
from transferkit.tune.sparse import MaskedLM, compose, domain_sft, nnz, resolve_k, topk_masks

K = 300


def _base_classifier(model, C=2):
    clf = model.classifier(C)
    clf.backbone = copy.deepcopy(model.backbone)
    return clf


def test_topk_masks_is_global():
    diffs = {"a": torch.tensor([[0.1, -5.0], [0.0, 2.0]]), "b": torch.tensor([3.0, -0.2, 1.0])}
    m = topk_masks(diffs, 3)
    assert m["a"].tolist() == [[False, True], [False, True]] and m["b"].tolist() == [True, False, False]
    assert resolve_k(1000, density=0.01) == 10 and resolve_k(1000, k=5000) == 1000
    with pytest.raises(ConfigError, match="positive integer"):
        resolve_k(10, k=0)
    with pytest.raises(ConfigError, match="density"):
        resolve_k(10, density=1.5)


@pytest.fixture(scope="module")
def task_run(tiny_bert_dir, sentiment_csv):
    model = text_model(tiny_bert_dir)
    tr, te = text_data(sentiment_csv)
    res = tune(model, tr, te, method="sparse", config={"k": K, "epochs": 6, "lr": 2e-2, "batch_size": 8},
               progress=False)
    return model, res


def test_lt_sft_mask_and_delta(task_run):
    model, res = task_run
    d = res.delta
    assert d.kind == "sparse" and nnz(d) <= K and res.metrics["k"] == K
    assert sum(int((v != 0).sum()) for v in to_dense(d).values()) <= K
    assert res.metrics["trainable_params"] == nnz(d) + 2 * 32 + 2  # K body entries + the dense new head
    assert set(k for k in d.tensors if k.startswith(NEW)) == {NEW + "head.weight", NEW + "head.bias"}
    # entries outside the mask are bitwise the pretrained ones; inside, the tuned values
    base = {"backbone." + k: v for k, v in model.backbone.state_dict().items()}
    tuned = {"backbone." + k: v for k, v in res.module.backbone.state_dict().items()}
    dense = to_dense(d)
    for name, t in tuned.items():
        if name not in dense:
            assert torch.equal(t, base[name]), name
            continue
        idx = d.tensors[name + SPARSE_IDX]
        outside = torch.ones(t.numel(), dtype=torch.bool)
        outside[idx] = False
        assert torch.equal(t.reshape(-1)[outside], base[name].reshape(-1)[outside]), name
        assert torch.allclose(t.reshape(-1)[idx], base[name].reshape(-1)[idx] + dense[name].reshape(-1)[idx], atol=1e-7)
    assert res.metrics["test_accuracy"] >= 0.75, res.metrics
    # applying the Delta to the pretrained model gives the tuned model
    clf = apply(_base_classifier(model), d)
    x = text_batch(model)
    assert torch.allclose(logits(clf, x), logits(res.module, x), atol=1e-6)


def test_sparse_delta_round_trip_and_apply_inverse(task_run, tmp_path):
    model, res = task_run
    res.delta.save(tmp_path / "d")
    d = Delta.load(tmp_path / "d")
    assert d.kind == "sparse" and d.meta["shapes"] == res.delta.meta["shapes"]
    assert all(torch.equal(d.tensors[k], v) for k, v in res.delta.tensors.items())
    clf = _base_classifier(model)
    before = {k: v.clone() for k, v in clf.backbone.state_dict().items()}
    apply(clf, d)
    apply(clf, d, scale=-1.0)  # θ0 + φ − φ
    assert all(torch.allclose(v, before[k], atol=1e-7) for k, v in clf.backbone.state_dict().items())


def _synthetic(base, seed, names, k=20, head=None):
    g = torch.Generator().manual_seed(seed)
    tensors, shapes = {}, {}
    for n in names:
        numel = base[n].numel()
        idx = torch.randperm(numel, generator=g)[:k].sort().values
        tensors[n + ".indices"], tensors[n + ".values"] = idx, torch.randn(idx.numel(), generator=g)
        shapes[n] = list(base[n].shape)
    if head is not None:
        tensors.update(head)
    return Delta("m", "sparse", tensors, {"shapes": shapes})


def test_compose_is_the_sum_of_dense_deltas():
    base = {"w": torch.randn(6, 5), "b": torch.randn(7), "u": torch.randn(3, 3)}
    a = _synthetic(base, 0, ["w", "b"], head={NEW + "head.weight": torch.ones(2, 2)})
    b = _synthetic(base, 1, ["w", "u"])
    ab, ba = compose(a, b), compose(b, a)
    da, db, dab = to_dense(a), to_dense(b), to_dense(ab)
    assert set(dab) == {"w", "b", "u"}
    for n in dab:
        assert torch.equal(dab[n], da.get(n, 0) + db.get(n, 0)), n
    assert all(torch.equal(ab.tensors[k], ba.tensors[k]) for k in ab.tensors)  # order-independent
    overlap = len(set(a.tensors["w.indices"].tolist()) & set(b.tensors["w.indices"].tolist()))
    assert nnz(ab) == nnz(a) + nnz(b) - overlap
    assert NEW + "head.weight" in ab.tensors
    with pytest.raises(Exception, match="different bases"):
        compose(a, Delta("other", "sparse", {}, {"shapes": {}}))


def test_domain_mlm_sft_composes_with_a_task_sft(tiny_bert_dir, sentiment_csv, task_run):
    model, task = task_run
    tr, _ = text_data(sentiment_csv)
    # the objective: only real, non-special tokens are targets
    tok = model.preprocess.tokenizer
    obj = MaskedLM(tok.mask_token_id, tok.vocab_size, tok.all_special_ids, 0.5)
    x = text_batch(model)
    torch.manual_seed(0)
    ids, labels = obj.mask_tokens(x["input_ids"], x["attention_mask"])
    sel = labels != -100
    assert sel.any() and torch.equal(labels[sel], x["input_ids"][sel])
    assert not any(bool((x["input_ids"][sel] == s).any()) for s in tok.all_special_ids)
    assert torch.equal(ids[~sel], x["input_ids"][~sel])
    # domain SFT on unlabeled text: ≤ K entries in the classifier's namespace
    dom = domain_sft(model, tr.X, k=200, config={"epochs": 1, "lr": 1e-3, "batch_size": 16})
    assert dom.kind == "sparse" and nnz(dom) <= 200 and dom.meta["objective"] == "mlm"
    assert all(k.startswith("backbone.model.") for k in dom.tensors)
    both = compose(dom, task.delta)
    dense = to_dense(both)
    for n, v in to_dense(dom).items():
        assert torch.equal(dense[n], v + to_dense(task.delta).get(n, torch.zeros_like(v)))
    clf = apply(_base_classifier(model), both)  # applies cleanly: domain + task + head
    seq = apply(apply(_base_classifier(model), dom), task.delta)
    x = text_batch(model)
    assert torch.allclose(logits(clf, x), logits(seq, x), atol=1e-5)


def test_sparse_with_domain_mlm_option_and_cnn(tiny_bert_dir, sentiment_csv):
    model = text_model(tiny_bert_dir)
    tr, te = text_data(sentiment_csv)
    res = tune(model, tr, te, method="sparse", progress=False,
               config={"k": 100, "epochs": 1, "domain_mlm": True, "domain_density": 0.005})
    d = res.delta
    assert [c["objective"] for c in d.meta["components"]] == ["mlm", "cross_entropy"]
    assert d.meta["task_nnz"] <= 100 and nnz(d) <= 100 + d.meta["domain_nnz"]
    cnn = image_model()
    itr, ite = image_data()
    r2 = tune(cnn, itr, ite, method="sparse", config={"k": 10, "epochs": 1, "batch_size": 8}, progress=False)
    assert nnz(r2.delta) <= 10
    with pytest.raises(ConfigError, match="Hugging Face text encoder"):
        tune(cnn, itr, ite, method="sparse", config={"k": 10, "epochs": 1, "domain_mlm": True}, progress=False)


def test_cli_sparse(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    from transferkit.cli import app

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("k: 50\n")
    res = CliRunner().invoke(app, ["tune", "--data", str(sentiment_csv), "--model", str(tiny_bert_dir), "--method",
                                   "sparse", "--epochs", "1", "--config", str(cfg), "--out", str(tmp_path / "o"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["nnz"] <= 50
    d = Delta.load(tmp_path / "o" / "delta")
    assert d.kind == "sparse" and nnz(d) <= 50 and (tmp_path / "o" / "history.json").is_file()
