#!/usr/bin/env python3
"""Reference PyTorch benchmark of d2l's ResNet-18 training step, for `cargo xtask bench --compare-pytorch`.

It builds the chapter's model exactly as d2l does (Residual with optional 1x1 conv, resnet_block,
b1..b5, AdaptiveAvgPool2d, Flatten, Linear(512, 10); the definition is shared with
make_parity_fixture.py), applies d2l's Xavier init, and times the same
step the Rust benchmark times: forward in training mode, cross-entropy, backward, SGD update (lr
0.05, as d2l's train_ch6), and the accuracy sync; or, for `--mode eval`, an eval-mode forward and
argmax. Data are random tensors of the right shape (d2l's examples/sec also excludes loading).

Prints one JSON object: {"examples_per_sec": median over windows, "windows": [...],
"peak_rss_bytes": ru_maxrss of this process, "torch": version, "threads": n}.

On a GPU (`--device cuda`) it also reports the peak GPU memory (`peak_device_bytes`); `--precision
bf16` runs the step under torch.autocast(bfloat16) with f32 weights, and `--tf32` allows TF32
matrix products and convolutions, the same settings as the Rust side's flags.

Usage: python3 scripts/bench_pytorch.py --mode train --resize 96 --batch 128 --threads 2
"""
import argparse
import json
import resource
import statistics
import time

import torch
from torch import nn

# The book's model, written once for both scripts (this directory is on sys.path when run).
from make_parity_fixture import d2l_resnet18, init_weights


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["train", "eval"], default="train")
    p.add_argument("--resize", type=int, default=96)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="steps per timed window")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["f32", "bf16", "f16"], default="f32")
    p.add_argument("--tf32", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    net = d2l_resnet18(64)
    net.apply(init_weights)
    net.to(dev)
    X = torch.rand(a.batch, 1, a.resize, a.resize, device=dev)
    y = torch.randint(0, 10, (a.batch,), device=dev)
    dtype = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[a.precision]
    autocast = lambda: torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        if a.mode == "train":
            net.train()
            opt.zero_grad()
            with autocast():
                y_hat = net(X)
            loss = loss_fn(y_hat.float(), y)
            loss.backward()
            opt.step()
            with torch.no_grad():
                (y_hat.argmax(1) == y).sum().item()
                loss.item()
        else:
            net.eval()
            with torch.no_grad(), autocast():
                net(X).argmax(1).tolist()

    for _ in range(a.warmup):
        step()
    windows = []
    for _ in range(a.windows):
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        windows.append(a.batch * a.steps / (time.perf_counter() - t))
    print(json.dumps({
        "examples_per_sec": statistics.median(windows),
        "windows": windows,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak_device_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
