#!/usr/bin/env bash
# Checks that a CPU without AVX-512 takes the AVX2 paths (gemm's products and the project's own
# kernels) and that they compute the same weights as the AVX-512 paths, and that the Winograd
# products give the same weights on the project's own kernel as on the gemm crate's.
#
# Trains the same tiny run (width 8, 512 real Fashion-MNIST images, 8 steps) four times:
#   1. natively (AVX-512 where the CPU has it),
#   2. natively with RESNET_SIMD=avx2 (the project's kernels capped at AVX2, where the Winograd
#      products run on its own kernel; gemm unchanged),
#   3. under Debian's qemu-user as a Haswell CPU (no AVX-512 anywhere: gemm and our kernels on AVX2),
#   4. natively with RESNET_PANELS=off (every product on the gemm crate's kernels),
# then compares the tensor bytes of the four checkpoints (the safetensors data section; the
# metadata holds wall-clock times and differs). A second run at 96 px and full width (256 images,
# 4 steps: the last stage's 3×3×512 convolutions, whose in-bounds taps forwards run on the
# project's own kernel at the AVX2 tier) is compared the same way natively, with
# RESNET_SIMD=avx2 and with RESNET_PANELS=off (not emulated: too slow under qemu). Both runs
# set the peak learning rate 0.15 (the `quick` preset's is 0.1), the rate of every run
# BENCHMARKS.md ("Vector paths") records, so that the bytes they print compare with its table.
#
#   apt-get install qemu-user dataset-fashion-mnist
#   cargo build --release -p resnet-cli && scripts/check_avx2_path.sh
#
# The emulated run takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/resnet-cli
data=${RESNET_DATA_DIR:-/usr/share/datasets/fashion-mnist}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
args=(train --preset quick --lr 0.15 --data-dir "$data" --limit-train 512 --limit-test 256 --width 8 --epochs 1
      --batch-size 64 --workers 1)

tensor_bytes() { # sha256 of a safetensors file's data section
    local n
    n=$(od -An -t u8 -N8 "$1" | tr -d ' ')
    tail -c +$((n + 9)) "$1" | sha256sum | cut -d' ' -f1
}

"$bin" "${args[@]}" --out "$out/native" > "$out/native.log" 2>&1
RESNET_SIMD=avx2 "$bin" "${args[@]}" --out "$out/avx2" > "$out/avx2.log" 2>&1
qemu-x86_64 -cpu Haswell "$bin" "${args[@]}" --out "$out/haswell" > "$out/haswell.log" 2>&1
RESNET_PANELS=off "$bin" "${args[@]}" --out "$out/gemm" > "$out/gemm.log" 2>&1
wide=(train --preset quick --lr 0.15 --data-dir "$data" --resize 96 --limit-train 256 --limit-test 128 --epochs 1
      --batch-size 64 --workers 1)
"$bin" "${wide[@]}" --out "$out/native96" > "$out/native96.log" 2>&1
RESNET_SIMD=avx2 "$bin" "${wide[@]}" --out "$out/avx2-96" > "$out/avx2-96.log" 2>&1
RESNET_PANELS=off "$bin" "${wide[@]}" --out "$out/gemm96" > "$out/gemm96.log" 2>&1

status=0
ref=$(tensor_bytes "$out/native/checkpoint.safetensors")
for run in native avx2 haswell gemm; do
    h=$(tensor_bytes "$out/$run/checkpoint.safetensors")
    printf '%-8s %s  %s\n' "$run" "$h" "$(grep '^loss' "$out/$run.log")"
    [ "$h" = "$ref" ] || status=1
done
ref=$(tensor_bytes "$out/native96/checkpoint.safetensors")
for run in native96 avx2-96 gemm96; do
    h=$(tensor_bytes "$out/$run/checkpoint.safetensors")
    printf '%-8s %s  %s\n' "$run" "$h" "$(grep '^loss' "$out/$run.log")"
    [ "$h" = "$ref" ] || status=1
done
if [ "$status" = 0 ]; then echo "same weights on every path"; else echo "the paths differ" >&2; fi
exit $status
