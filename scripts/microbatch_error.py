#!/usr/bin/env python3
"""How far apart PyTorch's own whole-batch and micro-batch updates are, in float32.

The Rust test `micro_batches_average_their_gradients` (tests/tests/training.rs) trains a
width-4 ResNet-18 for three steps on a batch made of the same 16 images twice, once as one
batch of 32 and once as two micro-batches of 16 whose gradients (each scaled by 1/2) are
accumulated. Each micro-batch has exactly the batch's BatchNorm statistics, so the two updates
are equal in exact arithmetic; in float32 they differ by rounding, and the test bounds the
difference per parameter tensor, relative to that tensor's update (a conv bias feeding a
BatchNorm against the larger of its own and its weight's update, since its true gradient is 0).

This script runs the same experiment in PyTorch (d2l's model, `torch.optim.SGD` with the test's
Nesterov momentum 0.9, weight decay 5e-4, label smoothing 0.1, learning rates 0.1, 0.05, 0.02)
over several seeds, in float32 and in float64, and prints the worst ratio of each run: what
PyTorch's own CPU path (oneDNN) gives for the quantity the Rust test bounds.

    python scripts/microbatch_error.py [--seeds 8] [--threads 2]
"""

import argparse
import copy
import importlib.util
import pathlib
import statistics

import torch
from torch.nn import functional as F

HERE = pathlib.Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("parity", HERE / "make_parity_fixture.py")
parity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parity)

HALF, SIDE, WIDTH = 16, 28, 4
LRS = (0.1, 0.05, 0.02)


def step(net, opt, x, y, micro):
    opt.zero_grad(set_to_none=True)
    if micro is None:
        F.cross_entropy(net(x), y, label_smoothing=0.1).backward()
    else:
        for xs, ys in zip(x.split(micro), y.split(micro)):
            (F.cross_entropy(net(xs), ys, label_smoothing=0.1) * (len(xs) / len(x))).backward()
    opt.step()


def worst_ratio(seed, dtype):
    torch.manual_seed(seed)
    net = parity.d2l_resnet18(WIDTH)
    net.apply(parity.init_weights)
    half = torch.rand(HALF, 1, SIDE, SIDE)
    x = torch.cat([half, half]).sub(0.286).div(0.353).to(dtype)
    labels = torch.randint(0, 10, (HALF,))
    y = torch.cat([labels, labels])
    before = {n: p.detach().clone() for n, p in net.to(dtype).named_parameters()}
    after = []
    for micro in (None, HALF):
        m = copy.deepcopy(net).train()
        opt = torch.optim.SGD(m.parameters(), lr=LRS[0], momentum=0.9, nesterov=True, weight_decay=5e-4)
        for lr in LRS:
            for g in opt.param_groups:
                g["lr"] = lr
            step(m, opt, x, y, micro)
        after.append({n: p.detach() for n, p in m.named_parameters()})
    whole, micro = after

    def update(name):
        return (whole[name] - before[name]).abs().max().item()

    worst = 0.0
    for name in whole:
        scale = update(name)
        if name.endswith("bias"):
            scale = max(scale, update(name[: -len("bias")] + "weight"))
        worst = max(worst, (whole[name] - micro[name]).abs().max().item() / (scale + 1e-9))
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    for dtype in (torch.float32, torch.float64):
        ratios = [worst_ratio(s, dtype) for s in range(args.seeds)]
        print(
            f"{str(dtype):>14}: worst ratio per seed "
            + ", ".join(f"{r:.1e}" for r in ratios)
            + f"; median {statistics.median(ratios):.1e}, max {max(ratios):.1e}"
        )


if __name__ == "__main__":
    main()
