"""`transferkit distill`: bad input is one line and exit 2 with nothing written; an end-to-end run on real
digits (a tuned CNN teacher → a smaller CNN student) that records the tune run's split and reloads."""

import json

import pytest
from _cli import bad, ok


def _cfg(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("args, message", [
    ([], "distill needs --data, --teacher and --student"),
    (["--method", "kdd"], "unknown distill method 'kdd' (did you mean 'kd'?)"),
    (["--epochs", "0"], "epochs"),
])
def test_bad_arguments(args, message, tmp_path):
    out = tmp_path / "out"
    bad(["distill", *args, "--out", out], message)
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("temperature: 0\n", "temperature"), ("alpha: 1.5\n", "alpha"), ("alpah: 0.5\n", "did you mean 'alpha'"),
    ("teacher_weights: [0, 0]\n", "positive sum"),
])
def test_bad_options_fail_before_any_data_is_loaded(text, message, tmp_path):
    out = tmp_path / "out"
    bad(["distill", "--data", "no-such-data", "--teacher", "x", "--student", "y", "--config", _cfg(tmp_path, text),
         "--out", out], message)
    assert not out.exists()


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    bad(["distill", "--data", "sklearn-digits", "--teacher", "digits-mnist", "--student", "digits-usps", "--out", f],
        "is a file")
    assert f.read_text() == "mine"


def test_list_comes_from_the_registry():
    res = ok(["distill", "--list", "--json"])
    listed = json.loads(res.stdout)
    from transferkit import registry

    assert set(listed) == set(registry.methods("distill")) >= {"kd", "nearest", "weighted", "kl_dp", "ncd"}
    assert {o["name"] for o in listed["kd"]["options"]} >= {"temperature", "alpha", "teacher_weights", "cache"}


@pytest.mark.assets
@pytest.mark.parametrize("args, message", [
    (["--teacher", "mobilenet-v2", "--student", "digits-usps"], "not the data's classes"),
    (["--teacher", "digits-mnist", "--student", "mobilenet-v2", "--method", "kl_dp"],
     "KL+DP transfers into a model that already predicts"),
    (["--teacher", "all-minilm-l6-v2", "--student", "digits-usps"], "takes text inputs"),
])
def test_models_that_do_not_fit_the_data(args, message, tmp_path):
    out = tmp_path / "out"
    bad(["distill", "--data", "sklearn-digits", "--limit", "100", *args, "--epochs", "1", "--out", out], message)
    assert not out.exists()


@pytest.mark.assets
def test_tuned_teacher_distilled_into_a_smaller_student_end_to_end(tmp_path):
    from transferkit.data.split import held_out, read_split
    from transferkit.distill import load_net
    from transferkit.distill._common import accuracy

    teacher, out = tmp_path / "teacher", tmp_path / "student"
    ok(["tune", "--data", "sklearn-digits", "--model", "digits-mnist", "--method", "full", "--epochs", "2",
        "--lr", "1e-3", "--out", teacher])
    res = ok(["distill", "--data", "sklearn-digits", "--teacher", teacher, "--student", "digits-usps",
              "--method", "kd", "--epochs", "3", "--out", out, "--json"])
    m = json.loads(res.stdout)
    assert m["student_params"] < 0.5 * 421_642  # digits-usps vs the digits-mnist teacher
    assert m["test_accuracy"] > 0.9 and m["teacher_test_accuracy"][str(teacher)] > 0.9
    # the same held-out items as the tune run (one split, recorded), and only those are scored
    split = read_split(out)
    assert split.to_dict() == read_split(teacher).to_dict() and m["n_test"] == len(split.test_ids)
    # the distilled student is a run folder: it reloads (as a teacher for the next distillation) and scores the same
    _, test = held_out(split)
    net = load_net(str(out), test.classes)
    assert accuracy(net.module, net, test) == pytest.approx(m["test_accuracy"])


@pytest.mark.assets
def test_kl_dp_between_two_pretrained_catalogue_models(tmp_path):
    """digits-usps and digits-svhn both predict the ten digits: KL+DP needs no tuning; delta = after − before."""
    res = ok(["distill", "--data", "sklearn-digits", "--limit", "400", "--teacher", "digits-svhn", "--student",
              "digits-usps", "--method", "kl_dp", "--epochs", "1", "--out", tmp_path / "o", "--json"])
    m = json.loads(res.stdout)
    assert m["transfer_delta"] == pytest.approx(m["test_accuracy"] - m["start_test_accuracy"])
    f = m["flips"]["digits-svhn"]
    assert len(f["per_class_positive"]) == 10 and 0 <= f["positive"] <= 1 and f["n"] == m["n_test"]
