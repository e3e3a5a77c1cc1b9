"""distill: compression by learned architecture — the derived-student builder (counts, identity), N2N's
REINFORCE, TAS's Gumbel/CWI aggregation and FLOP loss, end-to-end runs on real digits, unreachable targets."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.distill import arch as A
from transferkit.distill import n2n, tas
from transferkit.errors import ConfigError

from _cli import bad

CLASSES = [str(c) for c in range(10)]


def teacher(name):
    from transferkit.distill import load_net

    return load_net(name, CLASSES).module.eval()


def macs_by_hooks(net, x):
    """Multiply-accumulates of conv and linear layers, counted from the shapes seen in a forward pass."""
    total = []

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            total.append(out.shape[1] * out.shape[2] * out.shape[3] * m.in_channels * m.kernel_size[0] ** 2)
        elif isinstance(m, nn.Linear):
            total.append(m.in_features * m.out_features)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    net(x)
    for h in handles:
        h.remove()
    return sum(total)


# ------------------------------------------------------------------------------------------ the builder
@pytest.mark.assets
def test_counts_of_mnistnet_by_hand():
    arch, _ = A.describe(teacher("digits-mnist"))
    # conv 1→32 3×3 on 28², pool; conv 32→64 3×3 on 14², pool; fc 64·7·7→128; head 128→10
    params = (32 * 9 + 32) + (64 * 32 * 9 + 64) + (3136 * 128 + 128) + (128 * 10 + 10)
    flops = 32 * 9 * 28 * 28 + 64 * 32 * 9 * 14 * 14 + 3136 * 128 + 128 * 10
    assert A.count(arch) == (params, flops) == (421_642, 4_241_152)  # 421 642: the catalogue's parameter count


@pytest.mark.parametrize("name", ["digits-usps", "digits-svhn"])
@pytest.mark.assets
def test_counts_of_derived_students_match_the_built_networks(name):
    arch, _ = A.describe(teacher(name))
    keep = [True] * len(arch.layers)
    keep[1] = False  # a conv layer goes (its pool stays)
    widths = [max(1, l.out // 3) for l in arch.layers[:-1]] + [10]
    student = A.from_teacher(teacher(name), keep, widths)
    x = torch.zeros(2, arch.in_channels, arch.size, arch.size)
    params, flops = A.count(student.arch)
    assert params == sum(p.numel() for p in student.parameters())
    assert flops == macs_by_hooks(student, x)
    assert params < A.count(arch)[0]


@pytest.mark.parametrize("name", ["digits-mnist", "digits-usps", "digits-svhn"])
@pytest.mark.assets
def test_full_width_and_depth_reproduce_the_teacher_exactly(name):
    module = teacher(name)
    arch, _ = A.describe(module)
    student = A.from_teacher(module).eval()
    x = torch.randn(8, arch.in_channels, arch.size, arch.size)
    assert torch.equal(student(x), module(x))
    assert A.count(arch)[0] == sum(p.numel() for p in module.parameters())


@pytest.mark.assets
def test_narrower_student_keeps_the_teachers_first_channels():
    module = teacher("digits-usps")
    arch, mods = A.describe(module)
    student = A.from_teacher(module, widths=[8, 64, 128, 10])
    conv, bn = student.weights(0)
    assert torch.equal(conv.weight, mods[0][0].weight[:8]) and torch.equal(bn.running_var, mods[0][1].running_var[:8])
    assert torch.equal(student.weights(1)[0].weight, mods[1][0].weight[:, :8])


def test_a_network_that_is_not_a_chain_is_refused():
    from transferkit.zoo.base import Classifier

    with pytest.raises(ConfigError, match="conv → linear chains"):
        A.describe(Classifier(nn.Sequential(nn.Linear(4, 4)), 4, 2))


# ------------------------------------------------------------------------------------------ N2N
def test_n2n_reward_shape():
    assert n2n.reward(0.9, 100, 0.9, 100) == 0.0  # no compression, no reward
    assert n2n.reward(0.9, 50, 0.9, 100) == pytest.approx(0.5 * 1.5)  # C(2 − C) at C = 0.5
    assert n2n.reward(0.45, 25, 0.9, 100) == pytest.approx(0.75 * 1.25 * 0.5)
    assert n2n.reward(0.9, 101, 0.9, 100) == -1.0
    assert n2n.constrained(0.8, 0) == pytest.approx(0.8) and n2n.constrained(0.8, 15) == -1.0


@pytest.mark.parametrize("advantage", [1.0, -1.0])
@pytest.mark.assets
def test_reinforce_step_moves_the_sampled_action_with_the_sign_of_its_advantage(advantage):
    torch.manual_seed(0)
    policy = n2n.RemovalPolicy()
    desc, pinned = n2n.descriptions(list(A.describe(teacher("digits-svhn"))[0].layers)), [False] * 8

    def log_prob(keep):
        logits = policy.out(policy.lstm(desc)[0].squeeze(1))
        return torch.distributions.Categorical(logits=logits).log_prob(torch.tensor(keep, dtype=torch.long)).sum()

    keep, lp = policy.sample(desc, pinned)
    before = log_prob(keep).item()
    n2n.reinforce_loss([lp], [0.5 + advantage], 0.5).backward()
    torch.optim.SGD(policy.parameters(), lr=0.1).step()
    assert (log_prob(keep).item() - before) * advantage > 0


def test_per_rollout_advantages_tell_good_from_bad_rollouts():
    # two rollouts of one episode: the better one gains probability, the worse one loses (the reference
    # reinforced both with the episode's mean reward minus the baseline)
    logits = torch.zeros(2, requires_grad=True)
    dist = torch.distributions.Categorical(logits=logits)
    loss = n2n.reinforce_loss([dist.log_prob(torch.tensor(0)), dist.log_prob(torch.tensor(1))], [1.0, 0.0], 0.5)
    loss.backward()
    assert logits.grad[0] < 0 < logits.grad[1]  # gradient descent raises logit 0, lowers logit 1


@pytest.mark.assets
def test_removal_policy_learns_a_toy_reward():
    torch.manual_seed(0)
    policy = n2n.RemovalPolicy()
    desc, pinned = n2n.descriptions(list(A.describe(teacher("digits-svhn"))[0].layers)), [True] + [False] * 6 + [True]

    def p_remove():
        with torch.no_grad():
            return policy.out(policy.lstm(desc)[0].squeeze(1)).softmax(-1)[1:-1, 0].mean().item()

    start, log = p_remove(), []
    n2n.run_policy(policy, 0.03, 15, 4, lambda: policy.sample(desc, pinned),
                   lambda keep, e: sum(not k for k in keep) / 6, log, "toy")
    assert p_remove() > start + 0.2
    assert log[-1]["mean_reward"] > log[0]["mean_reward"]


# ------------------------------------------------------------------------------------------ TAS
@pytest.mark.assets
def test_gumbel_aggregation_at_a_one_hot_choice_is_the_channel_sliced_conv():
    module = teacher("digits-usps")
    arch, mods = A.describe(module)
    net = tas.SearchNet(arch, mods).eval()
    choices = net.choices[1]  # widths of the second conv (64 channels)
    big, small = len(choices) - 3, 1
    x = torch.randn(3, 20, 8, 8)  # 20 of the 32 input channels: the rest are zero-padded
    out = net.width_forward(1, x, [big, small], torch.tensor([1.0, 0.0]))
    c = choices[big]
    conv, bn = mods[1]
    plain = F.conv2d(x, conv.weight[:c, :20], conv.bias[:c], padding=1)
    plain = F.batch_norm(plain, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c], eps=bn.eps)
    assert out.shape == (3, c, 8, 8)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_a_zero_exponential_draw_gives_finite_gumbel_probabilities(monkeypatch):
    # upstream: -log(Exp draw) is inf when the draw is 0, and the softmax turns NaN (the reference loops on it)
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self: self.zero_())
    index, probs = tas.select2(torch.zeros(5), 1.0)
    assert torch.isfinite(probs).all() and len(set(index)) == 2
    assert torch.isfinite(tas._gumbel_probs(torch.zeros(3), 0.1)).all()


def test_cwi_is_adaptive_average_pooling_over_channels():
    x = torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    assert torch.equal(tas.cwi(x, 2)[0, :, 0, 0], torch.tensor([0.5, 2.5]))
    assert torch.equal(tas.cwi(x, 4), x)
    x = torch.randn(3, 19, 5, 5)
    for c in (7, 12, 30):  # the reference's adaptive_avg_pool3d, down and up
        torch.testing.assert_close(tas.cwi(x, c), F.adaptive_avg_pool3d(x, (c, 5, 5)))
    torch.testing.assert_close(tas.cwi(x[:, :, 0, 0], 7), F.adaptive_avg_pool1d(x[:, None, :, 0, 0], 7)[:, 0])


@pytest.mark.assets
def test_expected_flops_at_a_peaked_distribution_are_the_argmax_networks():
    module = teacher("digits-svhn")
    arch, mods = A.describe(module)
    net = tas.SearchNet(arch, mods).eval()
    with torch.no_grad():
        for i, w in enumerate(net.width_logits):
            w.fill_(0)
            w[min(i, len(w) - 1) % len(w)] = 60.0  # a mix of widths
        for d in net.depth_logits:
            d.fill_(0)
            d[0] = 60.0  # one conv per stage
        _, expected = net(torch.randn(2, 3, 32, 32), tau=1.0)
    keep, widths = net.derive()
    assert keep == [True, False, True, False, True, False, True, True]
    assert expected.item() == pytest.approx(A.count(A.derive(arch, keep, widths)[0])[1], rel=1e-5)


@pytest.mark.parametrize("target, direction", [(0.3, -1), (0.9, 1)])
@pytest.mark.assets
def test_flop_loss_pushes_the_architecture_toward_the_target(target, direction):
    torch.manual_seed(0)
    module = teacher("digits-mnist")
    arch, mods = A.describe(module)
    total = A.count(arch)[1]
    net = tas.SearchNet(arch, mods)
    with torch.no_grad():  # start at the widest (moving down) or the narrowest (moving up) widths
        for w in net.width_logits:
            w[-1 if direction < 0 else 0] = 0.5
    opt = torch.optim.Adam(net.arch_parameters(), lr=0.1)
    x = torch.randn(4, 1, 28, 28)
    ratios = []
    for _ in range(15):
        keep, widths = net.derive()
        current = A.count(A.derive(arch, keep, widths)[0])[1]
        ratios.append(current / total)
        opt.zero_grad()
        tas.flop_loss(net(x, 1.0)[1], current, target * total, 0.05 * total).backward()
        opt.step()
    assert (ratios[-1] - ratios[0]) * direction > 0.1
    assert tas.flop_loss(torch.tensor(5.0), 0.48, 0.5, 0.05).item() == 0.0  # inside the band: no loss


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def mnist():
    from transferkit.data.split import make_split

    return make_split("mnist", limit=500, seed=0)


@pytest.mark.parametrize("method, config", [
    ("tas", {"search_steps": 10, "search_batch_size": 16, "flop_ratio": 0.4}),
    ("n2n", {"remove_episodes": 1, "shrink_episodes": 1, "rollouts": 2, "candidate_steps": 5}),
])
@pytest.mark.assets
def test_end_to_end_on_real_digits_gives_a_smaller_trained_student(method, config, mnist, tmp_path):
    from transferkit.distill import distill, load_net
    from transferkit.distill._common import accuracy

    train, test, split = mnist
    res = distill(["digits-mnist"], "digits-mnist", train, test, method=method,
                  config={**config, "epochs": 2, "seed": 0}, out_dir=tmp_path / "run", split=split)
    m = res.metrics
    assert m["student_params"] == m["architecture"]["params"] < 421_642
    assert m["params_ratio"] < 1 and m["flops_ratio"] < 1
    assert m["test_accuracy"] > 0.8  # chance is 0.1
    assert res.history and res.history[-1]["step"] > 0
    # the run folder rebuilds the derived student (as a teacher for another distillation)
    net = load_net(str(tmp_path / "run"), CLASSES)
    assert accuracy(net.module, net, test) == pytest.approx(m["test_accuracy"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["architecture"] == m["architecture"]


@pytest.mark.assets
def test_unreachable_targets_are_one_line_errors(mnist, tmp_path):
    from transferkit.distill import distill

    train, test, _ = mnist
    with pytest.raises(ConfigError, match="flop_ratio 0.01 is out of reach"):
        distill(["digits-mnist"], "digits-mnist", train, test, method="tas", config={"flop_ratio": 0.01})
    with pytest.raises(ConfigError, match="params_ratio 0.001 is out of reach"):
        distill(["digits-mnist"], "digits-mnist", train, test, method="n2n", config={"params_ratio": 0.001})
    cfg, out = tmp_path / "cfg.json", tmp_path / "out"
    cfg.write_text(json.dumps({"flop_ratio": 0.01}))
    bad(["distill", "--data", "mnist", "--limit", "200", "--teacher", "digits-mnist", "--student", "digits-mnist",
         "--method", "tas", "--config", cfg, "--out", out], "out of reach")
    assert not out.exists()
