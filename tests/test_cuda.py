"""GPU paths (skipped without CUDA): the engine trains on the GPU, mixed precision works, features and a
LoRA-merged model agree with their CPU counterparts. Run them on a GPU machine with
``pytest tests/test_cuda.py``."""

import numpy as np
import pytest
import torch
from torch import nn

from transferkit.engine import CrossEntropy, TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def toy(n, seed):
    centers = torch.randn(3, 8, generator=torch.Generator().manual_seed(42)) * 3
    y = torch.arange(n) % 3
    return centers[y] + torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)), y


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_engine_trains_on_the_gpu_and_matches_cpu():
    data, val = toy(240, 0), toy(60, 1)
    runs = {}
    for cpu in (True, False):
        model = mlp()
        torch.cuda.reset_peak_memory_stats()
        res = train(model, data, CrossEntropy(), TrainConfig(epochs=3, batch_size=16, lr=1e-2, progress=False, cpu=cpu),
                    val_data=val)
        runs[cpu] = (model, res, torch.cuda.max_memory_allocated())
    gpu_model, gpu_res, gpu_bytes = runs[False]
    assert runs[True][2] == 0 and gpu_bytes > 0  # the GPU run used the GPU, the cpu=True one did not
    assert next(gpu_model.parameters()).device.type == "cpu"  # handed back on the device it came on
    assert gpu_res.metrics["val_accuracy"] >= 0.9
    for (n, a), (_, b) in zip(runs[True][0].state_dict().items(), gpu_model.state_dict().items()):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-5, msg=n)
    # and back: accelerate's per-process state must not pin a later cpu=True run to the GPU
    again = mlp()
    train(again, data, CrossEntropy(), TrainConfig(epochs=1, batch_size=16, lr=1e-2, progress=False, cpu=True))
    assert next(again.parameters()).device.type == "cpu"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision):
    model = mlp()
    res = train(model, toy(240, 0), CrossEntropy(),
                TrainConfig(epochs=4, batch_size=16, lr=1e-2, progress=False, mixed_precision=precision), val_data=toy(60, 1))
    assert res.metrics["val_accuracy"] >= 0.9


def test_features_on_gpu_equal_cpu(tiny_bert_dir, sentiment_csv):
    from transferkit.data import load_dataset
    from transferkit.features import extract
    from transferkit.zoo import load_model

    model, ds = load_model(str(tiny_bert_dir)), load_dataset(str(sentiment_csv))
    cpu = extract(model, ds, cache=False, progress=False, device="cpu")
    gpu = extract(model, ds, cache=False, progress=False, device="cuda")
    assert next(model.backbone.parameters()).device.type == "cpu"  # moved back
    np.testing.assert_allclose(gpu.X, cpu.X, rtol=1e-4, atol=1e-5)


def test_lora_tuned_on_gpu_applies_exactly_on_cpu(tiny_bert_dir, sentiment_csv, tmp_path):
    import copy

    from test_tune_common import logits

    from transferkit.data import load_dataset
    from transferkit.delta import apply
    from transferkit.tune import tune
    from transferkit.zoo import load_model

    ds = load_dataset(str(sentiment_csv))
    model = load_model(str(tiny_bert_dir))
    res = tune(model, ds, ds, method="lora", config={"r": 4, "epochs": 4, "lr": 1e-2}, out_dir=tmp_path, progress=False)
    assert res.metrics["test_accuracy"] > 0.9  # learns (2 epochs at 5e-3 sat at chance from some head starts)
    clf = model.classifier(len(ds.classes), seed=0)
    clf.backbone = copy.deepcopy(model.backbone)
    apply(clf, res.delta)  # the Delta a GPU run saved, applied to the CPU base
    batch = model.preprocess(list(ds.X[:16]))
    torch.testing.assert_close(logits(clf, batch), logits(res.module.cpu(), batch), rtol=1e-4, atol=1e-5)


def _signature_patch_on(device: str):
    """A CPU signature patched into a model on ``device`` and BN re-estimated there from CPU batches."""
    from transferkit.merge import patch, reestimate_bn, robust_signature

    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))

    sig = robust_signature(net(0), net(1), net(2), layers=None)  # on the CPU
    model = patch(net(1).to(device).eval().requires_grad_(False), sig, 0.5)
    reestimate_bn(model, [x])
    return model


def test_cpu_signature_patches_a_gpu_model_and_bn_reestimates_there():
    cpu, gpu = _signature_patch_on("cpu"), _signature_patch_on("cuda")
    assert gpu[1].running_mean.device.type == "cuda"
    for (n, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-5, msg=n)
