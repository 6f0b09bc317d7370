#!/usr/bin/env bash
# The one-shot GPU check of issue 13, run from the device bundle that
# `cargo xtask build-cuda --cudnn --bundle` builds (README, "GPU"):
#
#     bash device_check.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else ./device-check-out
#
# In at most 8 minutes wall (each phase under `timeout`; budget below) it
#   (a) checks every op on the GPU against the CPU, forward and backward, f32 and bf16
#       (`resnet-cli device-check --ops-only`: PASS/FAIL per op),
#   (b) times our training steps at 96 px/batch 256 and 224 px/batch 128 in f32, --tf32 and
#       --precision bf16, and evaluation at 96/256, for candle's kernels and cuDNN's, and
#   (c) PyTorch eager (bench_pytorch.py) on the same configurations on the same GPU,
#       alternating with ours, configuration by configuration,
#   (d) trains the d2l preset on the bundled Fashion-MNIST for as many epochs as fit its slot,
#       printing d2l's lines,
# and writes OUT_DIR/results.json and OUT_DIR/results.md (plus every phase's raw log).
#
# Without a usable GPU it runs the same phases on the CPU at tiny sizes, labelled CPU, so the
# whole path is exercised anywhere: the op checks then report SKIPPED, never PASS.
#
# Environment:
#   PYTHON                          Python with torch for (c) (default: python3)
#   RESNET_DEVICE_CHECK_LIB_DIRS    extra library folders (colon-separated) searched first
#   RESNET_DEVICE_CHECK_STUB_DIR    LOCAL PROOF ONLY: a folder with the build's link-only
#                                   libcuda.so stub (every call fails), put on the library path
#                                   so the CUDA binary loads on a machine without a driver and
#                                   falls back to the CPU. Never set on a GPU machine.
#   RESNET_DEVICE_CHECK_FORCE_CPU   1: skip the GPU even if one is there (tiny CPU sizes)
# Special modes:
#   device_check.sh --print-lib-path    print the library path it would use, then exit
set -u

HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}

# Wall-clock budget in seconds (480 in all): setup 20, (a) 60, (b)+(c) 200, (d) 180,
# report 20. Each phase's commands run under `timeout`, so a hang costs its slot only; the
# phases end at fixed points from the start, so time an earlier phase leaves over goes to the
# next one, and (d) ends BUDGET_REPORT seconds before the 480.
BUDGET_SETUP=20
BUDGET_OPS=60
BUDGET_BENCH=200
BUDGET_TRAIN=180
BUDGET_REPORT=20

# Libraries the CUDA resnet-cli loads (besides the driver's libcuda.so.1).
NEEDED_LIBS="libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudnn.so.9"

# Prints the library folders to search, one per line: RESNET_DEVICE_CHECK_LIB_DIRS, then the
# nvidia/*/lib folders of the Python packages PyTorch brings (nvidia/cu13/lib, nvidia/cudnn/lib,
# ...), for each library the system loader (`ldconfig -p`) does not already know.
cuda_lib_dirs() {
    local dirs=() missing=() lib d
    if [ -n "${RESNET_DEVICE_CHECK_LIB_DIRS:-}" ]; then
        IFS=: read -r -a extra <<< "$RESNET_DEVICE_CHECK_LIB_DIRS"
        for d in "${extra[@]}"; do [ -d "$d" ] && dirs+=("$d"); done
    fi
    local known
    known=$( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null) | awk '{print $1}')
    for lib in $NEEDED_LIBS; do
        if ! grep -qx "$lib" <<< "$known"; then missing+=("$lib"); fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        local py_dirs
        py_dirs=$("$PYTHON" -c 'import glob, os, sys
try:
    import nvidia
except ImportError:
    sys.exit(0)
for root in list(nvidia.__path__):
    for d in sorted(glob.glob(os.path.join(root, "*", "lib"))):
        print(d)' 2>/dev/null)
        while IFS= read -r d; do [ -n "$d" ] && [ -d "$d" ] && dirs+=("$d"); done <<< "$py_dirs"
    fi
    printf '%s\n' "${dirs[@]+"${dirs[@]}"}"
}

# LD_LIBRARY_PATH for the CUDA binary: the folders above, the local-proof stub last.
lib_path() {
    local path="" d
    while IFS= read -r d; do [ -n "$d" ] && path="${path:+$path:}$d"; done < <(cuda_lib_dirs)
    if [ -n "${RESNET_DEVICE_CHECK_STUB_DIR:-}" ]; then
        path="${path:+$path:}$RESNET_DEVICE_CHECK_STUB_DIR"
    fi
    [ -n "${LD_LIBRARY_PATH:-}" ] && path="${path:+$path:}$LD_LIBRARY_PATH"
    printf '%s\n' "$path"
}

if [ "${1:-}" = "--print-lib-path" ]; then
    lib_path
    exit 0
fi

OUT_DIR=${1:-${OUT:-$PWD/device-check-out}}
mkdir -p "$OUT_DIR" || { echo "device_check: cannot create $OUT_DIR" >&2; exit 2; }
LOG="$OUT_DIR/device_check.log"
: > "$LOG"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

# ---- setup: the binary, the libraries, the data -------------------------------------------
BIN="$OUT_DIR/resnet-cli"
if [ -f "$HERE/resnet-cli.xz" ]; then
    if command -v xz >/dev/null 2>&1; then
        timeout "$BUDGET_SETUP" xz -dc "$HERE/resnet-cli.xz" > "$BIN"
    else
        timeout "$BUDGET_SETUP" "$PYTHON" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$HERE/resnet-cli.xz" "$BIN"
    fi || { say "cannot decompress resnet-cli.xz (needs xz or Python's lzma)"; exit 2; }
    chmod +x "$BIN"
elif [ -x "$HERE/resnet-cli" ]; then
    cp "$HERE/resnet-cli" "$BIN"
else
    say "no resnet-cli(.xz) next to this script"; exit 2
fi
STUB=${RESNET_DEVICE_CHECK_STUB_DIR:-}
if [ -n "$STUB" ] && [ ! -e "$STUB/libcuda.so.1" ] && [ -e "$STUB/libcuda.so" ]; then
    # The build's stub is named for the linker (libcuda.so); the loader asks for its soname.
    mkdir -p "$OUT_DIR/stub" && ln -sf "$(cd "$STUB" && pwd)/libcuda.so" "$OUT_DIR/stub/libcuda.so.1"
    export RESNET_DEVICE_CHECK_STUB_DIR="$OUT_DIR/stub"
    say "LOCAL PROOF: the link-only libcuda stub is on the library path; every CUDA call fails"
fi
LIBS=$(lib_path)
export LD_LIBRARY_PATH="$LIBS"
say "library path: ${LIBS:-<system only>}"
MISSING=$(ldd "$BIN" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')
if [ -n "$MISSING" ]; then
    say "resnet-cli cannot load: missing $MISSING"
    say "install PyTorch with CUDA 13 (its nvidia-* packages carry these), or point RESNET_DEVICE_CHECK_LIB_DIRS at them"
    exit 3
fi
DATA="$HERE/data"
[ -d "$DATA" ] || DATA=""
export RUST_LOG=${RUST_LOG:-warn}

# GPU or CPU fallback: ask the binary whether it can open cuda:0 (device-check reports why not).
MODE=gpu
if [ "${RESNET_DEVICE_CHECK_FORCE_CPU:-0}" = 1 ]; then
    MODE=cpu
elif ! timeout 60 "$BIN" device-check --device cuda --ops-only --no-op-checks --out "$OUT_DIR/probe.json" \
        >> "$LOG" 2>&1 || ! grep -q '"cuda": true' "$OUT_DIR/probe.json" 2>/dev/null; then
    MODE=cpu
fi
if [ "$MODE" = gpu ]; then
    DEVICE=cuda
    CONFIGS="train:96:256 train:224:128 eval:96:256"
    PRECISIONS="f32 tf32 bf16"
    STEPS=10; WARMUP=3
    TORCH_DEVICE=cuda
else
    DEVICE=cpu
    CONFIGS="train:28:16 eval:28:32"
    PRECISIONS="f32 tf32 bf16"
    STEPS=2; WARMUP=1
    TORCH_DEVICE=cpu
    say "NO USABLE GPU: running the CPU fallback at tiny sizes (labelled CPU in the results)"
fi
say "mode $MODE, setup took $(elapsed) s"

# ---- (a) every op on the device against the CPU ------------------------------------------------
say "(a) op checks (budget ${BUDGET_OPS} s)"
timeout -k 5 "$BUDGET_OPS" "$BIN" device-check --device "$DEVICE" --ops-only --out "$OUT_DIR/ops.json" \
    2>&1 | tee "$OUT_DIR/ops.log" | tee -a "$LOG"
OPS_RC=${PIPESTATUS[0]}
say "(a) exit status $OPS_RC after $(elapsed) s"

# ---- (b) ours and (c) PyTorch, alternating per configuration -----------------------------
say "(b)+(c) timings, ours and PyTorch alternating (budget ${BUDGET_BENCH} s)"
BENCH_END=$(( T0 + BUDGET_SETUP + BUDGET_OPS + BUDGET_BENCH ))
TORCH_OK=0
if "$PYTHON" -c 'import torch' >/dev/null 2>&1; then TORCH_OK=1; else say "(c) skipped: $PYTHON has no torch"; fi
: > "$OUT_DIR/torch.jsonl"
n=0
for cfg in $CONFIGS; do
    IFS=: read -r mode resize batch <<< "$cfg"
    for p in $PRECISIONS; do
        left=$(( BENCH_END - $(date +%s) ))
        if [ "$left" -le 5 ]; then say "(b)+(c) out of time before $cfg $p"; break 2; fi
        slot=$(( left < 60 ? left : 60 ))
        timeout -k 5 "$slot" "$BIN" device-check --device "$DEVICE" --no-op-checks --configs "$cfg" \
            --precisions "$p" --gpu-ops candle,cudnn --steps "$STEPS" --warmup "$WARMUP" \
            --out "$OUT_DIR/ours-$n.json" >> "$OUT_DIR/ours.log" 2>&1
        say "ours $cfg $p: exit $? ($(tail -n 3 "$OUT_DIR/ours.log" | grep -c examples/s) timed)"
        if [ "$TORCH_OK" = 1 ]; then
            left=$(( BENCH_END - $(date +%s) ))
            [ "$left" -le 5 ] && { say "(c) out of time before $cfg $p"; break 2; }
            slot=$(( left < 60 ? left : 60 ))
            tprec=f32; tflag=""
            [ "$p" = bf16 ] && tprec=bf16
            [ "$p" = tf32 ] && tflag=--tf32
            if [ "$TORCH_DEVICE" = cpu ] && [ "$p" != f32 ]; then
                echo "{\"mode\": \"$mode\", \"resize\": $resize, \"batch\": $batch, \"precision\": \"$p\", \"status\": \"SKIPPED\", \"reason\": \"$p needs a CUDA device\"}" >> "$OUT_DIR/torch.jsonl"
            else
                (cd "$HERE" && timeout -k 5 "$slot" "$PYTHON" bench_pytorch.py --mode "$mode" \
                    --resize "$resize" --batch "$batch" --device "$TORCH_DEVICE" --precision "$tprec" $tflag \
                    --warmup "$WARMUP" --windows 1 --steps "$STEPS" --threads "$(nproc)") \
                    > "$OUT_DIR/torch-$n.out" 2>> "$OUT_DIR/torch.log"
                rc=$?
                out=$(tail -n 1 "$OUT_DIR/torch-$n.out")
                "$PYTHON" - "$mode" "$resize" "$batch" "$p" "$rc" "$out" >> "$OUT_DIR/torch.jsonl" <<'PY'
import json, sys
mode, resize, batch, p, rc, out = sys.argv[1:7]
row = {"mode": mode, "resize": int(resize), "batch": int(batch), "precision": p}
try:
    row.update(json.loads(out)); row["status"] = "OK"
except ValueError:
    row.update(status="FAILED", reason=f"bench_pytorch.py exit {rc}; see torch.log")
print(json.dumps(row))
PY
                say "PyTorch $cfg $p: $(tail -n 1 "$OUT_DIR/torch.jsonl" | cut -c1-160)"
            fi
        fi
        n=$((n + 1))
    done
done
say "(b)+(c) done after $(elapsed) s"

# ---- (d) the d2l preset on the real data --------------------------------------------------
TRAIN_SLOT=$(( T0 + BUDGET_SETUP + BUDGET_OPS + BUDGET_BENCH + BUDGET_TRAIN - $(date +%s) ))
[ "$TRAIN_SLOT" -lt 30 ] && TRAIN_SLOT=30
say "(d) d2l preset (slot ${TRAIN_SLOT} s)"
GPU_OPS=candle
if [ "$MODE" = gpu ] && "$PYTHON" - "$OUT_DIR/ops.json" <<'PY'
import json, sys
checks = json.load(open(sys.argv[1]))["op_checks"]
cudnn = [c for c in checks if c["gpu_ops"] == "cudnn"]
sys.exit(0 if cudnn and all(c["outcome"] == "PASS" for c in cudnn) else 1)
PY
then GPU_OPS=cudnn; fi
if [ "$MODE" = gpu ]; then
    # Epochs that fit: our measured f32 speed at 96/256 (train) plus evaluation, with a margin.
    EPOCHS=$("$PYTHON" - "$OUT_DIR" "$TRAIN_SLOT" "$GPU_OPS" <<'PY'
import glob, json, sys
out, budget, ops = sys.argv[1], float(sys.argv[2]), sys.argv[3]
train = evl = None
for f in glob.glob(out + "/ours-*.json"):
    for t in json.load(open(f)).get("timings", []):
        if t.get("status") == "OK" and t["precision"] == "f32" and t["gpu_ops"] == ops and t["resize"] == 96:
            if t["mode"] == "train": train = t["examples_per_sec"]
            else: evl = t["examples_per_sec"]
if not train:
    print(1); sys.exit()
epoch = 60000 / train + 10000 / (evl or train * 2) + 4.0
print(max(1, min(10, int((budget - 25) / (epoch * 1.3)))))
PY
)
    TRAIN_ARGS=(--preset d2l --device cuda --epochs "$EPOCHS" --gpu-ops "$GPU_OPS")
else
    EPOCHS=1
    TRAIN_ARGS=(--preset d2l --device cpu --epochs 1 --resize 28 --batch-size 64 --limit-train 1024 --limit-test 512)
fi
[ -n "$DATA" ] && TRAIN_ARGS+=(--data-dir "$DATA")
say "resnet-cli train ${TRAIN_ARGS[*]}"
timeout -s INT -k 20 "$TRAIN_SLOT" "$BIN" train "${TRAIN_ARGS[@]}" --out "$OUT_DIR/d2l-run" \
    > "$OUT_DIR/d2l.out" 2> "$OUT_DIR/d2l.err"
TRAIN_RC=$?
grep -E '^epoch [0-9]+:' "$OUT_DIR/d2l.err" | tee -a "$LOG"
tee -a "$LOG" < "$OUT_DIR/d2l.out"
say "(d) exit status $TRAIN_RC after $(elapsed) s"

# ---- results.json and results.md ----------------------------------------------------------
timeout "$BUDGET_REPORT" "$PYTHON" - "$OUT_DIR" "$MODE" "$OPS_RC" "$TRAIN_RC" "$EPOCHS" "$GPU_OPS" "$(elapsed)" <<'PY'
import glob, json, os, re, sys
out, mode, ops_rc, train_rc, epochs, gpu_ops, secs = sys.argv[1:8]
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
ops = load(os.path.join(out, "ops.json")) or {}
probe = load(os.path.join(out, "probe.json")) or {}
ours = []
for f in sorted(glob.glob(os.path.join(out, "ours-*.json")), key=lambda p: int(re.findall(r"\d+", p)[-1])):
    ours += (load(f) or {}).get("timings", [])
torch = [json.loads(l) for l in open(os.path.join(out, "torch.jsonl")) if l.strip()] if os.path.exists(os.path.join(out, "torch.jsonl")) else []
err = open(os.path.join(out, "d2l.err")).read() if os.path.exists(os.path.join(out, "d2l.err")) else ""
d2l_out = open(os.path.join(out, "d2l.out")).read() if os.path.exists(os.path.join(out, "d2l.out")) else ""
epochs_lines = [l for l in err.splitlines() if re.match(r"^epoch \d+:", l)]
results = {
    "mode": mode.upper(),
    "device": ops.get("device"),
    "gpu_probe": probe.get("device"),
    "wall_seconds": int(secs),
    "op_checks": ops.get("op_checks", []),
    "op_check_exit_status": int(ops_rc),
    "ours": ours,
    "pytorch": torch,
    "d2l": {"gpu_ops": gpu_ops, "epochs_requested": int(epochs), "exit_status": int(train_rc),
            "epoch_lines": epochs_lines, "final_lines": d2l_out.splitlines()},
}
json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=2)
L = []
label = "GPU" if mode == "gpu" else "CPU FALLBACK (no usable GPU; op checks SKIPPED)"
L.append(f"# Device check: {label}\n")
L.append(f"Device: {results['device']}  \nGPU probe (cuda:0): {results['gpu_probe']}  \nWall time: {secs} s\n")
L.append("## (a) Ops on the device against the CPU\n")
L.append("| outcome | op | kernels | dtype | max rel. error | tolerance | detail |")
L.append("|---|---|---|---|---|---|---|")
for c in results["op_checks"]:
    e = "-" if c.get("max_error") is None else f"{c['max_error']:.2e}"
    L.append(f"| {c['outcome']} | {c['op']} | {c['gpu_ops']} | {c['dtype']} | {e} | {c['tolerance']:.0e} | {c['detail']} |")
L.append("\n## (b) ours and (c) PyTorch eager, same device, alternating\n")
L.append("| mode | px | batch | precision | ours candle ex/s | ours cuDNN ex/s | PyTorch ex/s | ours candle mem GiB | ours cuDNN mem GiB | PyTorch mem GiB |")
L.append("|---|---|---|---|---|---|---|---|---|---|")
def cell(row, key, scale=1.0, fmt="{:.1f}"):
    if row is None: return "-"
    if row.get("status") != "OK": return row.get("status", "-")
    v = row.get(key)
    return "-" if v is None else fmt.format(v / scale)
keys = []
for r in ours + torch:
    k = (r["mode"], r["resize"], r["batch"], r["precision"])
    if k not in keys: keys.append(k)
G = float(1 << 30)
for k in keys:
    c = next((r for r in ours if (r["mode"], r["resize"], r["batch"], r["precision"]) == k and r["gpu_ops"] == "candle"), None)
    d = next((r for r in ours if (r["mode"], r["resize"], r["batch"], r["precision"]) == k and r["gpu_ops"] == "cudnn"), None)
    t = next((r for r in torch if (r["mode"], r["resize"], r["batch"], r["precision"]) == k), None)
    L.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {cell(c, 'examples_per_sec')} | {cell(d, 'examples_per_sec')} | {cell(t, 'examples_per_sec')} | "
             f"{cell(c, 'device_memory_peak_bytes', G, '{:.2f}')} | {cell(d, 'device_memory_peak_bytes', G, '{:.2f}')} | {cell(t, 'peak_device_bytes', G, '{:.2f}')} |")
L.append("\nOurs: device memory in use (total - free) after the timed steps; PyTorch: torch.cuda.max_memory_allocated.\n")
L.append(f"## (d) d2l preset ({gpu_ops} kernels, {epochs} epoch(s) requested, exit status {train_rc})\n")
L.append("```")
L += epochs_lines + d2l_out.splitlines()
L.append("```")
open(os.path.join(out, "results.md"), "w").write("\n".join(L) + "\n")
print(f"wrote {out}/results.json and {out}/results.md")
PY
say "done in $(elapsed) s (mode $MODE); results in $OUT_DIR/results.md"
