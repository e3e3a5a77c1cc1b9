"""distill: robustify (Jain et al., ICCV'23) — the three-head loss by hand, the head choice on constructed
logits, AugMix, the frozen student's frozen parts unchanged (only the tuned blocks and the heads move), an
end-to-end run on real Fashion-MNIST with a real MobileNetV2 student and digit-CNN teacher, and bad input."""

import numpy as np
import pytest
import torch
from _cli import bad

from transferkit.distill import distill, load_net
from transferkit.distill.robustify import (RobustifyOptions, RobustStudent, augmix, choose_heads, kl_heads,
                                           robustify_loss)
from transferkit.errors import ConfigError, DataError


# ---------------------------------------------------------------------------------------- the loss
def _log_softmax(z):
    z = z.double()
    return z - torch.log(torch.exp(z).sum(-1, keepdim=True))


def _ce(z, y):
    return float(-_log_softmax(z)[torch.arange(len(y)), y].mean())


def _kd(s, t, y, T, a):
    ps, pt = _log_softmax(s / T), _log_softmax(t / T)
    kl = float((pt.exp() * (pt - ps)).sum(-1).mean())
    return a * _ce(s, y) + (1 - a) * T * T * kl


def test_loss_is_the_three_heads_terms_computed_by_hand():
    g = torch.Generator().manual_seed(0)
    clean, aug = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    tc, ta = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 1])
    T, a = 3.0, 0.2
    loss, parts = robustify_loss(clean, aug, tc, ta, y, T, a)
    expected = {"clean": _ce(clean[0], y), "robust": _kd(aug[1], ta, y, T, a),
                "mixed": 0.5 * (_kd(clean[2], tc, y, T, a) + _kd(aug[2], ta, y, T, a))}
    for k, v in expected.items():
        assert float(parts[k]) == pytest.approx(v, rel=1e-5)
    assert float(loss) == pytest.approx(sum(expected.values()), rel=1e-5)


def test_each_head_gets_gradient_only_from_its_own_terms():
    clean = torch.randn(3, 4, 5, requires_grad=True)
    aug = torch.randn(3, 4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    robustify_loss(clean, aug, torch.randn(4, 5), torch.randn(4, 5), y, 4.0, 0.1)[0].backward()
    assert clean.grad[1].abs().sum() == 0  # the robust head never sees clean inputs
    assert aug.grad[0].abs().sum() == 0    # the clean head never sees augmented ones
    assert clean.grad[0].abs().sum() > 0 and aug.grad[1].abs().sum() > 0 and aug.grad[2].abs().sum() > 0


# ---------------------------------------------------------------------------------------- head choice
def test_head_choice_follows_the_kl_and_entropy_rule():
    big = 8.0
    # item 0: all heads agree → clean; item 1: robust disagrees with clean and is sharper than mixed → robust;
    # item 2: robust disagrees with clean, mixed is the sharper → mixed; item 3: as 1 but a threshold above its KL
    clean = torch.tensor([[big, 0, 0], [big, 0, 0], [big, 0, 0], [big, 0, 0]])
    robust = torch.tensor([[big, 0, 0], [0, big, 0], [0, 1.0, 0], [0, big, 0]])
    mixed = torch.tensor([[big, 0, 0], [0, 1.0, 0], [0, 0, big], [0, 1.0, 0]])
    logits = torch.stack([clean, robust, mixed])
    d = kl_heads(logits)
    assert d[0] == pytest.approx(0.0, abs=1e-6) and d[1] > 1 and d[2] > 0.1
    threshold = float(d[1:3].min()) / 2
    assert choose_heads(logits, threshold)[:3].tolist() == [0, 1, 2]
    assert choose_heads(logits, float(d[3]))[3] == 0  # d ≤ τ keeps the clean head
    assert choose_heads(logits, float("inf")).tolist() == [0, 0, 0, 0]


def test_forward_returns_the_chosen_heads_logits():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))
    m = RobustStudent(backbone, 5, 3, tune_layers=1, seed=0).eval()
    m.kl_threshold.fill_(0.01)
    x = torch.randn(16, 6)
    z = m.all_heads(x)
    idx = choose_heads(z, 0.01)
    assert torch.equal(m(x), z[idx, torch.arange(16)])
    assert m.tuned == ["2"] and not m.backbone[0].weight.requires_grad and m.backbone[2].weight.requires_grad


# ---------------------------------------------------------------------------------------- augmentation
def test_augmix_is_seeded_keeps_shape_and_changes_images():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 12, 12), dtype=np.uint8)
    a, b, c = augmix(x, 1), augmix(x, 1), augmix(x, 2)
    assert a.dtype == np.uint8 and a.shape == x.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, x)
    rgb = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    assert augmix(rgb, 0, width=2).shape == rgb.shape


# ---------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """mobilenet-v2 (at 32 px) ← digits-mnist robustified on 300 Fashion-MNIST items, one epoch each."""
    from transferkit.data.split import make_split
    from transferkit.zoo import load_model

    torch.set_num_threads(1)
    train, test, split = make_split("fashion-mnist", limit=300, seed=0)
    zoo = load_model("mobilenet-v2", size=32)
    before = {k: v.clone() for k, v in zoo.backbone.state_dict().items()}
    out = tmp_path_factory.mktemp("robustify") / "run"
    res = distill(["digits-mnist"], load_net(zoo, list(train.classes)), train, test, method="robustify",
                  config={"epochs": 1, "teacher_epochs": 1, "seed": 0}, out_dir=out, split=split)
    return res, before, zoo, test


@pytest.mark.assets
def test_only_the_tuned_blocks_and_heads_change(real_run):
    res, before, zoo, _ = real_run
    module = res.student
    assert module.tuned == ["features.17", "features.18"]
    after = module.backbone.state_dict()
    for k, v in before.items():
        if module.is_tuned(k):
            continue
        assert torch.equal(after[k], v), k  # weights and BatchNorm statistics of the frozen part
    moved = [k for k in before if module.is_tuned(k) and v_changed(before[k], after[k])]
    assert any(k.endswith("weight") for k in moved) and any(k.endswith("running_mean") for k in moved)
    assert all(torch.equal(zoo.backbone.state_dict()[k], v) for k, v in before.items())  # the zoo copy untouched
    assert {k for k in res.delta.tensors if not k.startswith("new.")} == {"backbone." + k for k in moved}


def v_changed(a, b):
    return a.is_floating_point() and not torch.equal(a, b)


@pytest.mark.assets
def test_frozen_part_stays_in_eval_mode_while_training():
    from transferkit.zoo import load_model

    m = RobustStudent(load_model("mobilenet-v2", size=32).backbone, 1280, 10, tune_layers=2, seed=0).train()
    assert not m.backbone.features[0][1].training and m.backbone.features[17].training and m.heads.training
    assert not m.backbone.classifier[0].training  # the backbone's dropout stays off


@pytest.mark.assets
def test_end_to_end_metrics_and_run_folder(real_run):
    res, _, _, test = real_run
    m = res.metrics
    assert m["method"] == "robustify" and 0 <= m["test_accuracy"] <= 1 and m["n_test"] == len(test)
    assert sum(m["head_chosen"].values()) == len(test) and set(m["head_accuracy"]) == {"clean", "robust", "mixed"}
    assert m["kl_threshold"] >= 0 and m["tuned_params"] < m["student_params"] / 2
    # test accuracy is the accuracy of each item's chosen head
    from transferkit.zoo import load_model

    prep = load_model("mobilenet-v2", size=32).preprocess
    with torch.no_grad():
        z = res.student.all_heads(prep(test.X))
    idx = choose_heads(z, m["kl_threshold"])
    right = (z[idx, torch.arange(len(test))].argmax(-1) == torch.as_tensor(test.y)).double().mean()
    assert m["test_accuracy"] == pytest.approx(float(right), abs=1e-9)
    assert [int((idx == k).sum()) for k in range(3)] == list(m["head_chosen"].values())
    for name in ("delta", "metrics.json", "history.json", "split.json"):
        assert (res.out_dir / name).exists(), name


# ---------------------------------------------------------------------------------------- bad input
def test_bad_options_are_one_line_config_errors():
    from transferkit.distill._common import split_config

    with pytest.raises(ConfigError, match="augment"):
        split_config("robustify", {"augment": "cutmix"})
    with pytest.raises(ConfigError, match="kl_quantile"):
        split_config("robustify", {"kl_quantile": 1.5})
    with pytest.raises(ConfigError, match="did you mean 'tune_layers'"):
        split_config("robustify", {"tune_layer": 3})
    with pytest.raises(ConfigError, match="tune_layers = 99"):
        RobustStudent(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), 2, 2, tune_layers=99, seed=0)
    with pytest.raises(ConfigError, match="no block list"):
        RobustStudent(torch.nn.Linear(2, 2), 2, 2, tune_layers=1, seed=0)
    assert RobustifyOptions().tune_layers == 2


def test_text_data_and_two_teachers_are_refused(sentiment_csv):
    from transferkit.data import load_dataset

    ds = load_dataset(str(sentiment_csv))
    with pytest.raises(DataError, match="robustify augments images"):
        _run_fn(ds, 1)
    from transferkit.data.split import make_split

    train, _, _ = make_split("sklearn-digits", limit=60, seed=0)
    with pytest.raises(ConfigError, match="one small teacher"):
        _run_fn(train, 2)


def _run_fn(data, n_teachers):
    from transferkit.distill.robustify import run_robustify
    from transferkit.engine import TrainConfig

    return run_robustify([None] * n_teachers, None, data, None, options=RobustifyOptions(), cfg=TrainConfig(),
                         classes=list(data.classes))


def test_teacher_without_the_classes_and_no_robustifying_is_refused():
    from transferkit.data.split import make_split
    from transferkit.engine import TrainConfig
    from transferkit.distill.robustify import robustify_teacher

    train, _, _ = make_split("sklearn-digits", limit=60, seed=0)
    teacher = load_net("mobilenet-v2", list(train.classes))  # predicts ImageNet classes
    with pytest.raises(ConfigError, match="teacher_epochs > 0"):
        robustify_teacher(teacher, train, None, RobustifyOptions(teacher_epochs=0), TrainConfig(), list(train.classes))


def test_cli_bad_option_exits_2_and_writes_nothing(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("augment: mixup\n")
    out = tmp_path / "out"
    bad(["distill", "--method", "robustify", "--data", "fashion-mnist", "--teacher", "digits-mnist", "--student",
         "mobilenet-v2", "--config", cfg, "--out", out], "augment")
    assert not out.exists()


@pytest.mark.assets
@pytest.mark.slow
def test_pipeline_stage_runs_robustify(tmp_path):
    from transferkit.pipeline import run_pipeline

    cfg = {"name": "d", "targets": [{"data": "sklearn-digits", "limit": 300}], "models": ["digits-usps"],
           "metrics": ["logme"], "tune": {"method": "full", "top_k": 1, "config": {"epochs": 1}},
           "distill": {"student": "digits-svhn", "method": "robustify", "config": {"epochs": 1, "teacher_epochs": 1}},
           "seeds": [0]}
    s = run_pipeline(cfg, tmp_path / "run", progress=False)
    run = s["distill"]["runs"]["sklearn-digits"]
    assert 0 <= run["accuracy"] <= 1 and (tmp_path / "run" / run["dir"] / "metrics.json").is_file()
