#!/usr/bin/env python3
"""Learning parity with PyTorch: d2l's recipe trained by both sides on several seeds.

Runs, for every seed, `resnet-cli train --preset d2l` (d2l's ResNet-18, plain SGD lr 0.05, batch
256, no normalisation or augmentation) and the same recipe in PyTorch with the book's model
(`make_parity_fixture.d2l_resnet18`, Xavier init as `train_ch6`), on the real Fashion-MNIST, and
reports each side's test accuracy two ways:

* as printed: after every epoch, evaluation mode with the BatchNorm running statistics that
  training left (momentum 0.1), which is what both `train_ch6` and `resnet-cli` print;
* with re-estimated statistics: the final weights loaded into the PyTorch model, every
  BatchNorm's running mean and variance recomputed as the exact average over the whole training
  set (`momentum=None`, one pass, no gradient), then evaluated. Both sides' weights go through
  the same PyTorch code, so this compares what the two trainings learned, not how their
  statistics lag behind the weights.

It also loads our final weights into PyTorch with our own running statistics and checks that
PyTorch prints our last epoch's test accuracy (a cross-check of the export).

The criterion the accuracy issue sets: for each measure, the two sides' means agree when the
difference is within the sum of their standard errors (sd / sqrt(seeds)).

Usage (from the repository root, after `cargo build --release -p resnet-cli`; needs torch,
safetensors and numpy; about 5 minutes per seed on 2 cores at 28 px):

    python scripts/learning_parity.py --seeds 0 1 2 3 4 --out /tmp/parity
    python scripts/learning_parity.py --seeds 0 1 2 3 4 --conv-algorithm im2col --out /tmp/parity-im2col

Writes `results.json` and `results.md` into `--out` (and one run folder per seed for our side).
Data order, initial weights and rounding differ between the sides, so single seeds differ; only
the means are compared.
"""
import argparse
import gzip
import json
import math
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_parity_fixture import d2l_resnet18, init_weights  # noqa: E402

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(path):
    """An IDX file (gzip'd) as a numpy array, checking the header against the byte count."""
    data = gzip.open(path, "rb").read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        sys.exit(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        sys.exit(f"{path}: header says {dims} but holds {len(body)} bytes (truncated?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_data(data_dir):
    arrays = {}
    for key, name in FILES.items():
        path = pathlib.Path(data_dir) / name
        if not path.is_file():
            sys.exit(f"{path} missing: run `cargo xtask fetch-data` or pass --data-dir")
        arrays[key] = read_idx(path)
    # ToTensor: bytes / 255, shape (n, 1, 28, 28); no normalisation in d2l's recipe.
    x = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)  # noqa: E731
    y = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return x(arrays["train_images"]), y(arrays["train_labels"]), x(arrays["test_images"]), y(arrays["test_labels"])


@torch.no_grad()
def accuracy(net, x, y, batch=256):
    net.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


@torch.no_grad()
def reestimated_accuracy(state, train_x, test_x, test_y, batch=256):
    """Test accuracy of `state` after every BatchNorm's statistics are recomputed over the
    training set as an exact average (PyTorch's cumulative mode, `momentum=None`)."""
    net = d2l_resnet18(64)
    net.load_state_dict(state, strict=True)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    for i in range(0, len(train_x), batch):
        net(train_x[i:i + batch])
    return accuracy(net, test_x, test_y)


def train_pytorch(seed, epochs, data, lr=0.05, batch=256):
    """d2l's `train_ch6` on the CPU: Xavier init, SGD, cross-entropy, shuffled batches of 256
    with the last partial batch kept; test accuracy after every epoch."""
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(seed)
    net = d2l_resnet18(64)
    net.apply(init_weights)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    printed = []
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss_fn(net(train_x[idx]), train_y[idx]).backward()
            opt.step()
        printed.append(accuracy(net, test_x, test_y))
    return printed, {k: v.clone() for k, v in net.state_dict().items()}


def train_ours(cli, seed, epochs, out, conv_algorithm, data_dir, threads):
    run = out / f"ours-seed{seed}"
    if run.exists():
        sys.exit(f"{run} exists: pass a new --out")
    cmd = [str(cli), "train", "--preset", "d2l", "--resize", "28", "--epochs", str(epochs), "--seed", str(seed),
           "--out", str(run), "--data-dir", str(data_dir), "--threads", str(threads)]
    if conv_algorithm:
        cmd += ["--conv-algorithm", conv_algorithm]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    printed = [r["test_acc"] for r in records if r.get("kind") == "epoch"]
    tensors = load_file(str(run / "checkpoint.safetensors"))
    state = {k: v for k, v in tensors.items() if not k.startswith("train.")}
    return printed, state


def summary(values):
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": mean, "sd": sd, "se": sd / math.sqrt(len(values)), "values": values}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cli", default="target/release/resnet-cli")
    p.add_argument("--conv-algorithm", default=None, help="passed to resnet-cli (default: its default)")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    data = load_data(a.data_dir)
    train_x, _, test_x, test_y = data
    rows = []
    for seed in a.seeds:
        t0 = time.time()
        ours_printed, ours_state = train_ours(a.cli, seed, a.epochs, out, a.conv_algorithm, a.data_dir, a.threads)
        as_loaded = d2l_resnet18(64)
        as_loaded.load_state_dict(ours_state, strict=True)
        ours_in_torch = accuracy(as_loaded, test_x, test_y)
        if abs(ours_in_torch - ours_printed[-1]) > 2e-3:
            sys.exit(f"seed {seed}: our weights score {ours_in_torch} in PyTorch but we printed {ours_printed[-1]}")
        ours_re = reestimated_accuracy(ours_state, train_x, test_x, test_y)
        t1 = time.time()
        torch_printed, torch_state = train_pytorch(seed, a.epochs, data)
        torch_re = reestimated_accuracy(torch_state, train_x, test_x, test_y)
        t2 = time.time()
        row = {"seed": seed, "ours_printed": ours_printed, "ours_in_pytorch": ours_in_torch,
               "ours_reestimated": ours_re, "pytorch_printed": torch_printed, "pytorch_reestimated": torch_re,
               "ours_seconds": t1 - t0, "pytorch_seconds": t2 - t1}
        rows.append(row)
        print(json.dumps(row), flush=True)
    measures = [(f"epoch {e + 1} as printed", lambda r, s, e=e: r[f"{s}_printed"][e]) for e in range(a.epochs)]
    measures.append((f"epoch {a.epochs}, statistics re-estimated", lambda r, s: r[f"{s}_reestimated"]))
    table = []
    for name, get in measures:
        ours = summary([get(r, "ours") for r in rows])
        theirs = summary([get(r, "pytorch") for r in rows])
        diff = ours["mean"] - theirs["mean"]
        table.append({"measure": name, "ours": ours, "pytorch": theirs, "difference": diff,
                      "agree": abs(diff) <= ours["se"] + theirs["se"]})
    result = {"seeds": a.seeds, "epochs": a.epochs, "conv_algorithm": a.conv_algorithm or "default",
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "rows": rows, "measures": table}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [f"d2l recipe at 28 px, {a.epochs} epochs, seeds {a.seeds}, conv algorithm "
             f"{result['conv_algorithm']}, torch {torch.__version__}", "",
             "| test accuracy | ours mean ± sd (se) | PyTorch mean ± sd (se) | difference | within se_a + se_b |",
             "|---|---|---|---|---|"]
    for t in table:
        f = lambda s: f"{s['mean']:.4f} ± {s['sd']:.4f} ({s['se']:.4f})"  # noqa: E731
        lines.append(f"| {t['measure']} | {f(t['ours'])} | {f(t['pytorch'])} | {t['difference']:+.4f} | "
                     f"{'yes' if t['agree'] else 'no'} |")
    lines += ["", "| seed | ours printed | ours re-estimated | PyTorch printed | PyTorch re-estimated |", "|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v: " / ".join(f"{x:.4f}" for x in v)  # noqa: E731
        lines.append(f"| {r['seed']} | {fmt(r['ours_printed'])} | {r['ours_reestimated']:.4f} | "
                     f"{fmt(r['pytorch_printed'])} | {r['pytorch_reestimated']:.4f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
