"""Benchmark: robust weight signatures (RWS) on MobileNetV2 fine-tuned on clean vs noisy Fashion-MNIST.

Cai, Zhang, Wang, "Robust Weight Signatures", ICML 2023 — :mod:`transferkit.merge.signatures`.

1. Fine-tune the ImageNet MobileNetV2 (``transferkit.tune``, method ``full``, new 10-way head, same head
   initialisation) twice: on clean Fashion-MNIST images (θ_clean) and on the same training images
   corrupted by additive Gaussian noise (θ_noise).
2. Signature RWS = (θ_noise − θ_pre) minus its projection on (θ_clean − θ_pre), per tensor, on the
   first ``--layers`` weight layers (shallow layers, as the paper).
3. Patch θ_clean + α·RWS for several α; optionally re-estimate BatchNorm statistics on a few batches
   of corrupted (or mixed clean+corrupted) training images; the int8-quantised signature too.
4. Report clean and corrupted test accuracy before/after, and the signature's size.

Images are resized to ``--size`` px (default 96, not 224: MobileNetV2 at 224 px is ≈ 5× slower per
image, too slow for this benchmark's CPU budget; the architecture and ImageNet weights are the same).
Corrupted test images use a different noise draw than the corrupted training images.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/merge_robust.py        # writes benchmarks/results/merge_robust.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "mobilenet-v2"


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def noisy(X: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = X.astype(np.float32) / 255.0 + rng.normal(0.0, sigma, size=X.shape).astype(np.float32)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def subset(ds, idx, X=None, name=None):
    from transferkit.data import make_dataset

    X = ds.X[idx] if X is None else X
    return make_dataset(name or ds.name, X, np.asarray(ds.y[idx], dtype=np.int64), classes=ds.classes, modality="image")


def batches(zm, X, y, bs=100):
    return [(zm.preprocess(X[s:s + bs]), torch.as_tensor(y[s:s + bs]).long()) for s in range(0, len(y), bs)]


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    correct = n = 0
    for x, y in data:
        correct += int((model(x).argmax(-1) == y).sum())
        n += len(y)
    return correct / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=80, help="images per class (train + test pool)")
    ap.add_argument("--test-frac", type=float, default=0.4)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--sigma", type=float, default=0.4, help="Gaussian noise std on [0, 1] pixels")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--layers", default="7,all", help="comma-separated: shallow weight layers in the signature "
                    "(an int, or 'all' for every parameter)")
    ap.add_argument("--alphas", default="1.0,2.0")
    ap.add_argument("--bn-batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "transferkit" / "derived" / "merge_robust")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.per_class, args.epochs, args.size = 8, 1, 32
        args.cache = Path("/tmp/merge_robust_quick")
    alphas = [float(a) for a in args.alphas.split(",")]
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from transferkit.data import load_dataset
    from transferkit.delta import Delta, apply
    from transferkit.merge import patch, reestimate_bn, robust_signature
    from transferkit.tune import tune
    from transferkit.zoo import Classifier, load_model

    zm = load_model(MODEL, size=args.size)
    ds = load_dataset("fashion-mnist", per_class=args.per_class, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(ds.y))
    n_test = int(round(len(perm) * args.test_frac))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    clean_train = subset(ds, tr, name="fmnist-clean")
    noisy_train = subset(ds, tr, noisy(ds.X[tr], args.sigma, args.seed + 1), name="fmnist-noise")
    test_clean = batches(zm, ds.X[te], ds.y[te])
    test_noisy = batches(zm, noisy(ds.X[te], args.sigma, args.seed + 2), ds.y[te])
    cfg = {"epochs": args.epochs, "lr": args.lr, "batch_size": 32, "seed": args.seed}
    cache = args.cache / f"pc{args.per_class}-s{args.size}-sig{args.sigma:g}-e{args.epochs}-lr{args.lr:g}-seed{args.seed}"

    def finetune(name, data):
        run = cache / name
        if (run / "delta" / "delta.json").is_file():
            return Delta.load(run / "delta")
        log(f"fine-tuning {name} on {len(data.y)} images at {args.size}px")
        return tune(zm, data, None, method="full", config=cfg, out_dir=run, progress=False).delta

    t0 = time.perf_counter()
    d_clean = finetune("clean", clean_train)
    d_noise = finetune("noise", noisy_train)
    ft_seconds = time.perf_counter() - t0

    pre = Classifier(copy.deepcopy(zm.backbone), zm.feature_dim, len(ds.classes), seed=args.seed)
    pre_state = {k: v.clone() for k, v in pre.state_dict().items()}

    def model_of(delta):
        m = copy.deepcopy(pre)
        m.load_state_dict(pre_state)
        return apply(m, delta)

    clean_m, noise_m = model_of(d_clean), model_of(d_noise)
    layer_settings = [None if x.strip() == "all" else int(x) for x in str(args.layers).split(",")]
    sigs = {L: robust_signature(pre_state, clean_m.state_dict(), noise_m.state_dict(), layers=L, name="gaussian")
            for L in layer_settings}
    n_model = sum(p.numel() for p in clean_m.parameters())

    ntr = noisy_train.X
    bn_noisy = [zm.preprocess(ntr[s:s + 32]) for s in range(0, 32 * args.bn_batches, 32)]
    half = 16
    bn_mixed = [zm.preprocess(np.concatenate([clean_train.X[s:s + half], ntr[s + half:s + 2 * half]]))
                for s in range(0, 32 * args.bn_batches, 32)]

    rows = []

    def row(name, model, **extra):
        r = {"model": name, "clean": accuracy(model, test_clean), "noisy": accuracy(model, test_noisy), **extra}
        rows.append(r)
        log(f"{name}: clean {r['clean']:.3f} noisy {r['noisy']:.3f}")
        return r

    base_row = row("clean fine-tune θ_clean (before)", clean_m, alpha=0.0, bn="fine-tuned")
    row("noise fine-tune θ_noise (reference)", noise_m, alpha=None, bn="fine-tuned")
    for bn_name, bn_data in (("re-est. noisy", bn_noisy), ("re-est. mixed", bn_mixed)):
        row(f"θ_clean, BN {bn_name} only (α = 0)", reestimate_bn(copy.deepcopy(clean_m), bn_data), alpha=0.0, bn=bn_name)
    for L, sig in sigs.items():
        tag = "all layers" if L is None else f"{L} layers"
        for a in alphas:
            patched = patch(copy.deepcopy(clean_m), sig, a)
            row(f"θ_clean + {a:g}·RWS ({tag})", patched, alpha=a, bn="fine-tuned", layers=L)
            for bn_name, bn_data in (("re-est. noisy", bn_noisy), ("re-est. mixed", bn_mixed)):
                row(f"θ_clean + {a:g}·RWS ({tag}), BN {bn_name}", reestimate_bn(copy.deepcopy(patched), bn_data),
                    alpha=a, bn=bn_name, layers=L)
        row(f"θ_clean + 1·RWS ({tag}, int8 signature), BN re-est. mixed",
            reestimate_bn(patch(copy.deepcopy(clean_m), sig.quantized(), 1.0), bn_mixed), alpha=1.0,
            bn="re-est. mixed", layers=L, quantized=True)

    for r in rows:
        r["clean_change_pp"] = 100 * (r["clean"] - base_row["clean"])
        r["noisy_gain_pp"] = 100 * (r["noisy"] - base_row["noisy"])
    patched_rows = [r for r in rows if r["alpha"] and r is not base_row]
    good = [r for r in patched_rows if r["noisy_gain_pp"] > 10 and r["clean_change_pp"] > -2]
    within = [r for r in patched_rows if r["clean_change_pp"] > -2]
    best = max(within, key=lambda r: r["noisy_gain_pp"]) if within else None
    cheapest = max(patched_rows, key=lambda r: (r["clean_change_pp"], r["noisy_gain_pp"]))
    result = {
        "benchmark": "merge_robust", "model": MODEL, "data": "fashion-mnist",
        "command": "OMP_NUM_THREADS=1 python benchmarks/merge_robust.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sizes": {"train": len(tr), "test": len(te)},
        "signatures": {("all" if L is None else str(L)): {
            "tensors": len(sig.tensors), "params": sum(v.numel() for v in sig.tensors.values()),
            "model_params": n_model, "int8_bytes": sig.nbytes(True), "float32_model_bytes": 4 * n_model,
            "compression_vs_model": round(4 * n_model / sig.nbytes(True), 1), "names": list(sig.tensors)}
            for L, sig in sigs.items()},
        "rows": rows, "fine_tune_seconds": round(ft_seconds, 1), "seconds": round(time.perf_counter() - t_start, 1),
        "target": {"text": "corrupted accuracy +10 pp at < 2 pp clean cost", "met": bool(good),
                   "best_within_clean_limit": best and best["model"],
                   "smallest_clean_cost": {k: cheapest[k] for k in ("model", "clean_change_pp", "noisy_gain_pp")}},
    }
    md = [f"# merge_robust: robust weight signatures on {MODEL} (Fashion-MNIST, Gaussian noise σ = {args.sigma:g})", "",
          f"Command: `{result['command']}`  ",
          f"{len(tr)} training / {len(te)} test images ({args.per_class}/class pool), {args.size} px, full fine-tunes "
          f"({args.epochs} epochs, lr {args.lr:g}), one seed ({args.seed}). Signatures: "
          + "; ".join(f"{'all layers' if L is None else f'first {L} weight layers'}: {len(sig.tensors)} tensors, "
                      f"{sum(v.numel() for v in sig.tensors.values()):,} of {n_model:,} parameters, "
                      f"{sig.nbytes(True) / 1024:.1f} KiB in int8 ({4 * n_model / sig.nbytes(True):.1f}× smaller than "
                      "the float32 model)" for L, sig in sigs.items())
          + f". BN re-estimation: {args.bn_batches} batches of 32 training images (noisy, or half clean/half noisy).",
          "", "| model | BN statistics | clean acc | noisy acc | clean change (pp) | noisy gain (pp) |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['bn']} | {r['clean']:.3f} | {r['noisy']:.3f} | {r['clean_change_pp']:+.1f} | "
                  f"{r['noisy_gain_pp']:+.1f} |")
    detail = (f"best patched row within the 2 pp clean-cost limit: {best['model']} ({best['noisy_gain_pp']:+.1f} pp "
              f"noisy, {best['clean_change_pp']:+.1f} pp clean)" if best else
              f"no patched row stays within 2 pp clean cost; the smallest clean cost is {cheapest['clean_change_pp']:+.1f} "
              f"pp ({cheapest['model']}, {cheapest['noisy_gain_pp']:+.1f} pp noisy)")
    md += ["", f"Target (issue 5): corrupted accuracy +10 pp at < 2 pp clean cost — **{'met' if good else 'missed'}**; "
           + detail + "."]
    text = "\n".join(md) + "\n"
    dest = Path("/tmp") if args.quick else RESULTS
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "merge_robust.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (dest / "merge_robust.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
