#!/usr/bin/env bash
# The speed goal's check (BENCHMARKS.md, "Current figures"), as one command: N invocations
# (default 3) of `xtask bench --compare-pytorch` on the goal's five configurations, each
# writing its JSON report, then per configuration the medians over the invocations of our and
# PyTorch's examples/s, the median ratio and its range, both peak RSS ranges, and whether the
# goal holds: at least 2.0× PyTorch in training at 28 px / 256 and 96 px / 128, 1.5× at
# 224 px / 32, 2.5× in evaluation at 96 px / 256, our peak RSS at most PyTorch's in every
# configuration (evaluation at 28 px has no ratio to meet). Exits 0 when it holds, 3 when it
# does not. Invocations the bench flags as unsteady (the matmul peak moving by more than a
# fifth, or more than 2 % of the time stolen) are listed and left out of the medians; at least
# three steady ones are needed.
#
#   cargo build --release -p xtask && cargo xtask fetch-data
#   scripts/bench_goal.sh /path/to/venv/bin/python      # a Python with torch 2.x installed
#
# N (default 3) and BIN (default target/release/xtask) override the defaults; the reports are
# kept in OUT (default a new directory under target/bench). Never run it while something else
# compiles: every figure is a ratio taken on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ]; then
    echo "usage: $0 PYTHON   (an interpreter with torch installed, e.g. ~/venv/bin/python)" >&2
    exit 2
fi
python=$1
bin=${BIN:-target/release/xtask}
n=${N:-3}
out=${OUT:-target/bench/goal-$(date -u '+%Y%m%dT%H%M%S')}
[ -x "$bin" ] || { echo "no $bin: build it with cargo build --release -p xtask" >&2; exit 1; }
command -v "$python" > /dev/null || { echo "no Python interpreter at $python" >&2; exit 1; }
"$python" -c 'import torch' 2>/dev/null || { echo "$python cannot import torch" >&2; exit 1; }
mkdir -p "$out"
echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $(git rev-parse --short HEAD 2>/dev/null || echo '?'); reports in $out"
for i in $(seq 1 "$n"); do
    echo "invocation $i of $n"
    RAYON_NUM_THREADS=2 "$bin" bench --compare-pytorch --python "$python" \
        --configs train:28:256,train:96:128,train:224:32,eval:96:256,eval:28:256 \
        --rounds 1 --windows 3 --steps 2 --json "$out/bench-$i.json" > "$out/bench-$i.log" 2>&1 \
        || { echo "invocation $i failed: see $out/bench-$i.log" >&2; exit 1; }
done
"$python" - "$out" "$n" <<'EOF'
import json, statistics, sys
from pathlib import Path

out, n = Path(sys.argv[1]), int(sys.argv[2])
reports = [json.loads((out / f"bench-{i}.json").read_text()) for i in range(1, n + 1)]
print(reports[0]["cpu"])
steady = []
for i, r in enumerate(reports, 1):
    before, after = r["matmul_peak_gflops"], r["matmul_peak_gflops_after"]
    steal = r.get("steal_fraction") or 0.0
    ok = 0.8 <= after / before <= 1.25 and steal <= 0.02
    bandwidth = ""
    if r.get("memory_read_gbps") is not None:
        bandwidth = f", memory read {r['memory_read_gbps']:.1f} GB/s, copy {r['memory_copy_gbps']:.1f}"
    print(f"invocation {i}: {r['date']}, matmul peak {before:.0f} -> {after:.0f} GFLOP/s{bandwidth}, "
          f"{100 * steal:.1f} % stolen{'' if ok else ': unsteady, left out'}")
    if ok:
        steady.append(r)
if len(steady) < 3:
    sys.exit(f"{len(steady)} steady invocations: the goal needs the medians of at least three; run again")

goal = {("train", 28, 256): 2.0, ("train", 96, 128): 2.0, ("train", 224, 32): 1.5, ("eval", 96, 256): 2.5}
gb = lambda b: b / 1e9
met = True
print(f"{'configuration':<22}{'ours':>9}{'PyTorch':>9}  {'ratio (range)':<22}{'RSS ours / PyTorch, GB':<26}goal")
for key in [("train", 28, 256), ("train", 96, 128), ("train", 224, 32), ("eval", 96, 256), ("eval", 28, 256)]:
    rows = [row for r in steady for row in r["rows"] if (row["mode"], row["resize"], row["batch"]) == key]
    if len(rows) != len(steady):
        sys.exit(f"{key}: missing from some reports")
    ours = statistics.median(r["examples_per_sec"] for r in rows)
    torch = statistics.median(r["pytorch_examples_per_sec"] for r in rows)
    ratios = [r["ratio"] for r in rows]
    ratio = statistics.median(ratios)
    rss = [r["peak_rss_bytes"] for r in rows]
    trss = [r["pytorch_peak_rss_bytes"] for r in rows]
    want = goal.get(key)
    holds = (want is None or ratio >= want) and max(rss) <= min(trss)
    met &= holds
    terms = ([f">= {want}x"] if want is not None else []) + ["RSS at most PyTorch's"]
    verdict = f"{'met' if holds else 'NOT met'} ({', '.join(terms)})"
    name = f"{key[0]} {key[1]} px / {key[2]}"
    spread = f"{ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
    memory = f"{gb(min(rss)):.2f}-{gb(max(rss)):.2f} / {gb(min(trss)):.2f}-{gb(max(trss)):.2f}"
    print(f"{name:<22}{ours:>9.1f}{torch:>9.1f}  {spread:<22}{memory:<26}{verdict}")
print("the goal is met" if met else "the goal is NOT met")
sys.exit(0 if met else 3)
EOF
