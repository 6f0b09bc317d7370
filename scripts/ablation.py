#!/usr/bin/env python3
"""The accuracy ablation: candidate `best` recipes trained on several seeds, one table.

Each row is one training recipe (the flags after `resnet-cli train`); each (row, seed) pair is
one run folder `<out>/<row>-s<seed>`. A finished run is read, not trained again; an interrupted
one (a folder with a checkpoint but fewer epochs than asked) is continued with `train --resume`,
which is exact, so the ablation can be spread over several sittings. Wall times of resumed runs
add up their sittings' epochs and are marked.

For every finished run the table reports:

* the headline: test accuracy of `best.safetensors`, the epoch chosen on the validation split
  (the test set chooses nothing), as the run evaluated it (with its weight average and flip
  test-time augmentation when the row uses them);
* the same checkpoint's last epoch scored again by `resnet-cli eval` without flip averaging
  (`--no-tta-hflip`) and, for rows with `--ema`, with the last weights instead of their average
  (`--last-weights`): evaluation-only ablations that need no second training run, because those
  two options change what is evaluated, not the training steps;
* minutes to the first epoch at 0.90 / 0.93 / 0.95 test accuracy (the run's own
  `time_to_accuracy` records), examples per second and the run's wall time.

Per row: mean ± sample sd over the finished seeds. The CPU is printed first; compare rows only
within one machine.

Usage (from the repository root, after `cargo build --release -p resnet-cli`; on 2 cores each
row costs the minutes its recipe takes, see BENCHMARKS.md "Training runs"):

    python3 scripts/ablation.py --out runs/ablation --seeds 0 1 --rows r28 r28-erase
    python3 scripts/ablation.py --out runs/ablation --seeds 0 1 --rows r28 r28-erase --report-only

Writes `results.json` and `results.md` into `--out`.
"""
import argparse
import json
import pathlib
import platform
import statistics
import struct
import subprocess
import sys
import time

# The candidate recipes. Shared: `--preset best` (Nesterov SGD lr 0.1, weight decay 5e-4, label
# smoothing 0.1, one warm-up epoch then cosine, batch 128, normalised inputs, flips, 5,000
# training images held out for validation).
COMMON = ["--preset", "best", "--tta-hflip", "--ema", "0.998"]
ROWS = {
    # d2l's model at native 28 px: the stem leaves 7×7 feature maps for the first stage.
    "r28": COMMON + ["--resize", "28", "--width", "64", "--epochs", "12", "--crop-padding", "3"],
    "r28-erase": COMMON + ["--resize", "28", "--width", "64", "--epochs", "12", "--crop-padding", "3", "--erase"],
    # Upsampled to 56 px at half width: 14×14 maps in the first stage for about the same products.
    "r56w32": COMMON + ["--resize", "56", "--width", "32", "--epochs", "8", "--crop-padding", "4"],
    "r56w32-erase": COMMON + ["--resize", "56", "--width", "32", "--epochs", "8", "--crop-padding", "4", "--erase"],
    # 56 px at d2l's full width: four times r28's products, 14×14 maps in the first stage.
    "r56": COMMON + ["--resize", "56", "--width", "64", "--epochs", "9", "--crop-padding", "4"],
    # r56w32 over twice the epochs: about an hour on a 2-core Xeon.
    "r56w32-e16": COMMON + ["--resize", "56", "--width", "32", "--epochs", "16", "--crop-padding", "4"],
}
MILESTONES = (0.90, 0.93, 0.95)


def cpu_name():
    fields = {}
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    return f"{fields.get('model name', '?')} (cpu family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def records(run):
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def planned_epochs(run):
    return json.loads((run / "config.json").read_text())["epochs"]


def finished(run):
    if not (run / "config.json").is_file():
        return False
    epochs = [r for r in records(run) if r["kind"] == "epoch"]
    return bool(epochs) and epochs[-1]["epoch"] >= planned_epochs(run)


def safetensors_metadata(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {})


def train(cli, row, seed, run, threads, data_dir):
    if (run / "checkpoint.safetensors").is_file():
        args = [cli, "train", "--resume", str(run)]
        sitting = "resumed"
    else:
        args = [cli, "train", *ROWS[row], "--seed", str(seed), "--out", str(run)]
        sitting = "new"
    if threads:
        args[1:1] = ["--threads", str(threads)]
    if data_dir and sitting == "new":
        args += ["--data-dir", data_dir]
    print(f"[{row} seed {seed}] {' '.join(args)}", flush=True)
    log = run.parent / f"{run.name}.log"
    with open(log, "a") as out:
        code = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{' '.join(args)} exited with {code}; its output is in {log}")
    (run / "sittings.txt").open("a").write(f"{sitting}\n")


def evaluate(cli, checkpoint, extra, data_dir):
    args = [cli, "eval", "--weights", str(checkpoint), "--json", *extra]
    if data_dir:
        args += ["--data-dir", data_dir]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)["test_acc"]


def summarise(cli, row, seed, run, data_dir):
    recs = records(run)
    epochs = [r for r in recs if r["kind"] == "epoch"]
    meta = safetensors_metadata(run / "best.safetensors")
    chosen = int(meta["selected_epoch"])
    config = json.loads((run / "config.json").read_text())
    result = {
        "row": row,
        "seed": seed,
        "flags": ROWS.get(row),
        "epochs": len(epochs),
        "selected_on": meta.get("selected_on"),
        "selected_epoch": chosen,
        "test_acc": epochs[chosen - 1]["test_acc"],
        "val_acc": epochs[chosen - 1].get("val_acc"),
        "last_test_acc": epochs[-1]["test_acc"],
        "test_acc_per_epoch": [e["test_acc"] for e in epochs],
        "examples_per_sec": statistics.median(e["examples_per_sec"] for e in epochs),
        "wall_minutes": sum(e["wall_seconds"] for e in epochs) / 60,
        "resumed": "resumed" in ((run / "sittings.txt").read_text() if (run / "sittings.txt").is_file() else ""),
        "minutes_to": {
            f"{r['test_acc']:.2f}": r["wall_seconds"] / 60 for r in recs if r["kind"] == "time_to_accuracy"
        },
    }
    checkpoint = run / "checkpoint.safetensors"
    if config.get("tta_hflip"):
        result["last_test_acc_without_tta"] = evaluate(cli, checkpoint, ["--no-tta-hflip"], data_dir)
    if config.get("ema_decay"):
        result["last_test_acc_last_weights"] = evaluate(cli, checkpoint, ["--last-weights"], data_dir)
    return result


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def minutes_to(rs, milestone):
    """Mean minutes to `milestone` over the seeds that reached it, and how many did if not all."""
    reached = [r["minutes_to"][f"{milestone:.2f}"] for r in rs if f"{milestone:.2f}" in r["minutes_to"]]
    if not reached:
        return "–"
    some = "" if len(reached) == len(rs) else f" ({len(reached)} of {len(rs)} seeds)"
    return f"{statistics.mean(reached):.1f}{some}"


def table(results, cpu):
    lines = [
        f"CPU: {cpu}",
        "",
        "| row | seeds | test acc (epoch chosen on val), per seed | mean ± sd | last epoch | "
        "last epoch without flip TTA | last epoch, last weights (no average) | "
        "min to 0.90 / 0.93 / 0.95 | examples/s | wall min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in dict.fromkeys(r["row"] for r in results):
        rs = [r for r in results if r["row"] == row]
        per_seed = ", ".join(f"{r['test_acc']:.4f} (s{r['seed']}, ep {r['selected_epoch']})" for r in rs)
        to = " / ".join(minutes_to(rs, m) for m in MILESTONES)
        resumed = " (resumed)" if any(r["resumed"] for r in rs) else ""
        lines.append(
            f"| {row} | {len(rs)} | {per_seed} | {mean_sd([r['test_acc'] for r in rs])} | "
            f"{mean_sd([r['last_test_acc'] for r in rs])} | "
            f"{mean_sd([r.get('last_test_acc_without_tta') for r in rs])} | "
            f"{mean_sd([r.get('last_test_acc_last_weights') for r in rs])} | {to} | "
            f"{statistics.mean(r['examples_per_sec'] for r in rs):.1f} | "
            f"{statistics.mean(r['wall_minutes'] for r in rs):.1f}{resumed} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", required=True, help="folder holding one run folder per row and seed")
    p.add_argument("--cli", default="target/release/resnet-cli")
    p.add_argument("--data-dir", default=None, help="passed to resnet-cli (default: its own search)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report-only", action="store_true", help="train nothing; tabulate the finished runs")
    a = p.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_name()
    print(f"CPU: {cpu}", flush=True)
    results = []
    for row in a.rows:
        for seed in a.seeds:
            run = out / f"{row}-s{seed}"
            if not finished(run) and not a.report_only:
                started = time.time()
                train(a.cli, row, seed, run, a.threads, a.data_dir)
                print(f"[{row} seed {seed}] done in {(time.time() - started) / 60:.1f} min", flush=True)
            if finished(run):
                results.append(summarise(a.cli, row, seed, run, a.data_dir))
            else:
                print(f"[{row} seed {seed}] not finished: left out", flush=True)
    (out / "results.json").write_text(json.dumps({"cpu": cpu, "runs": results}, indent=1))
    md = table(results, cpu)
    (out / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
