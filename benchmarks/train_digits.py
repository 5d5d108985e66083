"""Train convnext_atto from timm's init on scikit-learn's 8x8 digits (upsampled to 32x32), with
npconvnext and with timm on the same recipe, and report validation top-1 per epoch.

    python benchmarks/train_digits.py [--epochs 4] [--engines npconvnext,timm] [--threads N]

Recipe: AdamW lr 2e-3, weight decay 0.05 (not on 1-D parameters), batch 64, label smoothing 0.1,
no augmentation, no drop path, constant learning rate; a fixed 80/20 split of the 1797 digits.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

EPOCH_SEED = 0


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.kron(data.images / 8.0 - 1.0, np.ones((4, 4)))             # (N, 32, 32) in [-1, 1]
    x = np.repeat(images[:, None], 3, axis=1).astype(np.float32)           # (N, 3, 32, 32)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    return (x[order[:cut]], data.target[order[:cut]]), (x[order[cut:]], data.target[order[cut:]])


def batches(n, size, epoch):
    order = np.random.default_rng(EPOCH_SEED + epoch).permutation(n)
    return [order[i : i + size] for i in range(0, n, size)]


def run_npconvnext(train, val, epochs, batch):
    import npconvnext
    from npconvnext import train as training
    from npconvnext.model import ConvNeXt
    from npconvnext.params import init_state_dict

    config = npconvnext.get_config("convnext_atto", num_classes=10)
    model = ConvNeXt(config, init_state_dict(config, seed=0))
    opt = training.AdamW(model, lr=2e-3, weight_decay=0.05)
    for epoch in range(epochs):
        began = time.perf_counter()
        for idx in batches(len(train[0]), batch, epoch):
            opt.step(training.loss_and_grads(model, train[0][idx], train[1][idx], label_smoothing=0.1)[1])
        top1 = float((model(val[0]).argmax(1) == val[1]).mean())
        yield epoch + 1, top1, time.perf_counter() - began


def run_timm(train, val, epochs, batch):
    import timm
    import torch

    torch.manual_seed(0)
    net = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=2e-3)
    x_train, y_train = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    for epoch in range(epochs):
        began = time.perf_counter()
        net.train()
        for idx in batches(len(train[0]), batch, epoch):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx], label_smoothing=0.1)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            top1 = float((net(torch.from_numpy(val[0])).argmax(1).numpy() == val[1]).mean())
        yield epoch + 1, top1, time.perf_counter() - began


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--engines", default="npconvnext,timm")
    parser.add_argument("--threads", type=int, default=None, help="for both engines (default: their own)")
    args = parser.parse_args()
    if args.threads:
        import npconvnext
        import torch

        npconvnext.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    train, val = digits()
    print(f"digits: {len(train[0])} training, {len(val[0])} validation images, 32x32; batch {args.batch}")
    print(f"{'engine':<12} {'epoch':>5} {'val top-1':>10} {'epoch s':>9} {'CPU s':>7}")
    runners = {"npconvnext": run_npconvnext, "timm": run_timm}
    for engine in args.engines.split(","):
        cpu = time.process_time()
        for epoch, top1, seconds in runners[engine](train, val, args.epochs, args.batch):
            cpu, spent = time.process_time(), time.process_time() - cpu
            print(f"{engine:<12} {epoch:>5} {top1:>10.4f} {seconds:>9.1f} {spent:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
