#!/usr/bin/env python3
"""Writes the PyTorch reference fixtures for `tests/tests/pytorch_parity.rs`.

How to run (from the repository root; needs torch, safetensors and numpy, CPU is enough):

    python scripts/make_parity_fixture.py            # writes into tests/fixtures/
    python scripts/make_parity_fixture.py --out DIR  # writes elsewhere

The output is deterministic for a given torch version (fixed seed, CPU, float64 reference), so
re-running it only changes the fixtures when the model definition below or torch changes. The
Rust test reads the files without Python; regenerate them only when the model or this script
changes, and commit both files with the script.

What it writes (both plain safetensors files, well under 1 MB together):

* `tests/fixtures/pytorch_parity_weights.safetensors` -- exactly what d2l's own export would be:
  `safetensors.torch.save_file(net.state_dict(), ...)` of a float32 ResNet-18 built as the book
  builds it, only narrow (base width 4: channels 4, 8, 16, 32 instead of 64..512). Every key of the
  `state_dict` is there, `num_batches_tracked` included (int64 scalars, value 2), and there is no
  metadata, so the Rust side must infer the architecture from names and shapes.
* `tests/fixtures/pytorch_parity_reference.safetensors` -- what the Rust model must reproduce:
  - `input`           (4, 1, 32, 32) float32, the batch;
  - `eval_logits`     (4, 10) float32, `net.eval()(input)` (BatchNorm on running statistics);
  - `labels`          (4,) int64;
  - `train_logits`    (4, 10) float32, `net.train()(input)` on a fresh copy of the same weights;
  - `loss`            () float32, `F.cross_entropy(train_logits, labels)` (mean over the batch);
  - `grad.<name>`     the gradient of `loss` for every parameter `<name>` of `net.named_parameters()`;
  - `after_train.<bn>.running_mean` / `.running_var` / `.num_batches_tracked`: every BatchNorm
    buffer after that one training forward (PyTorch's momentum-0.1, unbiased-variance update).

Numerics and tolerances. The weights are created and warmed up in float32 and saved in float32,
so they (and the input) are exactly representable; the reference outputs are then computed in
float64 from those very values and rounded to float32 only for storage (a relative error of
6e-8 per element). The fixture is therefore "the exact answer" up to 6e-8 of each tensor's
scale, so the Rust test holds a float64 run to 1e-6 of scale (it sees about 5e-8: the storage
rounding). A float32 run adds float32 rounding, amplified by the training-mode BatchNorm layers
(batch statistics over as few as 4 values per channel in the last stage), so this script also
runs PyTorch itself in float32 and checks PyTorch's own float32 error against the float64
reference: the Rust float32 tolerances (1e-4 of scale for logits and loss, 1e-3 of each gradient
tensor's largest magnitude) must sit at least 10x above it, or the script refuses to write the
fixture (a ReLU input or max-pool tie within float32 noise of a kink would do that; change SEED).
With the current seed PyTorch float32 is at 3e-6 (training logits) and 1e-5 (worst gradient).

Conv biases that feed a BatchNorm (every conv but the 1x1 shortcut `conv3`) cancel in training
mode, because BatchNorm subtracts the per-channel batch mean: their true gradient is exactly
zero, and both sides compute rounding noise. Their errors are measured against the gradient of
their convolution's weight instead of against themselves (see `grad_scale`).

Beyond the book's initialisation (Xavier-uniform conv/linear weights, PyTorch-default biases,
BatchNorm at identity), the BatchNorm scale and shift are perturbed randomly, so that a mix-up of
gamma/beta or of batch and running statistics cannot hide behind gamma = 1, beta = 0.
"""

import argparse
import copy
import pathlib
import sys

import torch
from torch import nn
from torch.nn import functional as F

SEED = 20240611
BASE_WIDTH = 4
BATCH, SIDE = 4, 32
NUM_CLASSES = 10
# Rust-side tolerances (scale-relative max error), mirrored here to vet the fixture.
LOGITS_TOL_F32 = 1e-4
GRAD_TOL_F32 = 1e-3
# Demand that PyTorch's own float32 run beats the Rust float32 tolerances by this factor.
HEADROOM = 10.0


# --- d2l.ai, "Residual Networks (ResNet)", verbatim apart from the width ------------------------
class Residual(nn.Module):
    """The Residual block of ResNet models."""

    def __init__(self, input_channels, num_channels, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels, kernel_size=1, stride=strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return F.relu(Y)


def resnet_block(input_channels, num_channels, num_residuals, first_block=False):
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(input_channels, num_channels, use_1x1conv=True, strides=2))
        else:
            blk.append(Residual(num_channels, num_channels))
    return blk


def d2l_resnet18(w):
    b1 = nn.Sequential(
        nn.Conv2d(1, w, kernel_size=7, stride=2, padding=3),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    b2 = nn.Sequential(*resnet_block(w, w, 2, first_block=True))
    b3 = nn.Sequential(*resnet_block(w, 2 * w, 2))
    b4 = nn.Sequential(*resnet_block(2 * w, 4 * w, 2))
    b5 = nn.Sequential(*resnet_block(4 * w, 8 * w, 2))
    return nn.Sequential(b1, b2, b3, b4, b5, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(8 * w, NUM_CLASSES))


def init_weights(m):
    """d2l's `train_ch6` initialisation."""
    if type(m) == nn.Linear or type(m) == nn.Conv2d:
        nn.init.xavier_uniform_(m.weight)


# --- the reference computation -----------------------------------------------------------------
def train_step(net32, x32, labels, dtype):
    """Training-mode forward, mean cross-entropy and backward on a fresh copy in `dtype`."""
    net = copy.deepcopy(net32).to(dtype).train()
    logits = net(x32.to(dtype))
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    grads = {n: p.grad.detach() for n, p in net.named_parameters()}
    buffers = {n: b.detach() for n, b in net.named_buffers()}
    return logits.detach(), loss.detach(), grads, buffers


def bias_before_batch_norm(name):
    """True for the conv biases that feed a BatchNorm: every conv but the 1x1 shortcut `conv3`.

    In training mode BatchNorm subtracts the batch mean per channel, so such a bias cancels and
    the loss's gradient for it is exactly zero; computed gradients are rounding noise.
    """
    return name.endswith(".bias") and not name.startswith("7.") and ".conv3." not in name and (
        name == "0.0.bias" or ".conv" in name
    )


def grad_scale(name, grads):
    """The magnitude a gradient's error is measured against: its own largest entry, or for an
    analytically zero bias gradient, that of its convolution's weight gradient."""
    if bias_before_batch_norm(name):
        return grads[name[: -len("bias")] + "weight"].abs().max().item()
    return grads[name].abs().max().item()


def scaled_err(a, b, scale=None):
    """max |a - b| / scale, scale defaulting to max |b|: the error against the tensor's scale."""
    scale = b.double().abs().max().item() if scale is None else scale
    return (a.double() - b.double()).abs().max().item() / max(scale, 1e-30)


def main():
    # Imported here so that bench_pytorch.py, which imports the model from this file, runs where
    # only torch is installed (a GPU machine's PyTorch).
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = pathlib.Path(__file__).resolve().parent.parent
    parser.add_argument("--out", type=pathlib.Path, default=root / "tests" / "fixtures")
    args = parser.parse_args()

    torch.manual_seed(SEED)
    net = d2l_resnet18(BASE_WIDTH)
    net.apply(init_weights)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        # Two training-mode forwards on random data: non-trivial running statistics, and
        # num_batches_tracked = 2, all part of the state_dict.
        net.train()
        for _ in range(2):
            net(torch.randn(8, 1, SIDE, SIDE) * 2.0 + 0.5)
    x = torch.randn(BATCH, 1, SIDE, SIDE)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), dtype=torch.int64)

    # Evaluation mode, float64 reference and float32 PyTorch for the headroom check.
    with torch.no_grad():
        eval64 = copy.deepcopy(net).double().eval()(x.double())
        eval32 = copy.deepcopy(net).eval()(x)
    logits64, loss64, grads64, buffers64 = train_step(net, x, labels, torch.float64)
    logits32, loss32, grads32, _ = train_step(net, x, labels, torch.float32)

    errs = {"eval_logits": scaled_err(eval32, eval64), "train_logits": scaled_err(logits32, logits64)}
    errs["loss"] = scaled_err(loss32, loss64)
    grad_errs = {n: scaled_err(grads32[n], g, grad_scale(n, grads64)) for n, g in grads64.items()}
    worst = max(grad_errs, key=grad_errs.get)
    zero = max(
        scaled_err(torch.zeros(()), g, grad_scale(n, grads64)) for n, g in grads64.items() if bias_before_batch_norm(n)
    )
    print(f"largest float64 gradient of a conv bias before BatchNorm (exactly 0 in theory): {zero:.1e} of scale")
    print("PyTorch float32 vs float64, scale-relative: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    print(f"  worst gradient: {worst} {grad_errs[worst]:.1e}")
    if max(errs.values()) * HEADROOM > LOGITS_TOL_F32 or grad_errs[worst] * HEADROOM > GRAD_TOL_F32:
        sys.exit("PyTorch's own float32 error leaves under 10x headroom to the Rust tolerances; change SEED")

    f32 = lambda t: t.detach().to(torch.float32).contiguous()
    reference = {
        "input": f32(x),
        "eval_logits": f32(eval64),
        "labels": labels,
        "train_logits": f32(logits64),
        "loss": f32(loss64),
    }
    reference.update({f"grad.{n}": f32(g) for n, g in grads64.items()})
    for n, b in buffers64.items():
        reference[f"after_train.{n}"] = b.clone() if b.dtype == torch.int64 else f32(b)

    args.out.mkdir(parents=True, exist_ok=True)
    weights_path = args.out / "pytorch_parity_weights.safetensors"
    reference_path = args.out / "pytorch_parity_reference.safetensors"
    # Exactly d2l's export: the float32 state_dict, buffers and num_batches_tracked included.
    state = net.state_dict()
    save_file(state, str(weights_path))
    save_file(reference, str(reference_path))
    params = sum(p.numel() for p in net.parameters())
    print(f"torch {torch.__version__}: {len(state)} state_dict tensors, {params} parameters, loss {loss64.item():.6f}")
    for p in (weights_path, reference_path):
        print(f"wrote {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
