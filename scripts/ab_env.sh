#!/usr/bin/env bash
# A/B of one environment setting against the default, in one binary, alternating: the training
# and evaluation steps' examples/s with and without it, per configuration, and their ratio.
#
#   scripts/ab_env.sh RESNET_PANELS=all   # our product kernel at the AVX-512 tier, against the
#                                         # gemm crate's AVX-512 kernels (the default there)
#   scripts/ab_env.sh RESNET_SIMD=avx2    # the AVX2 path forced, against the CPU's own tier
#
# Each round runs every configuration once without the setting and once with it (which goes
# first alternates by round), each run `xtask bench-one` in a process of its own with the
# allocator settings the bench uses; the table gives the medians over the rounds and the
# ratio of the medians (with / without). Prints the CPU first: compare figures within one run.
# Needs a release build (`cargo build --release -p xtask`) and the data (`cargo xtask
# fetch-data`). ROUNDS (default 3), CONFIGS (default "train:28:256 train:96:128 train:224:32
# eval:96:256") and BIN (default target/release/xtask) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 1 ] || [[ "$1" != *=* ]]; then
    echo "usage: $0 NAME=VALUE   (e.g. RESNET_PANELS=all)" >&2
    exit 2
fi
setting=$1
bin=${BIN:-target/release/xtask}
rounds=${ROUNDS:-3}
read -r -a configs <<< "${CONFIGS:-train:28:256 train:96:128 train:224:32 eval:96:256}"
[ -x "$bin" ] || { echo "no $bin: build it with cargo build --release -p xtask" >&2; exit 1; }

grep -m1 '^model name' /proc/cpuinfo || true
grep -m1 '^cpu family' /proc/cpuinfo || true
grep -m1 '^model[[:space:]]' /proc/cpuinfo || true
if grep -qm1 avx512f /proc/cpuinfo; then echo "AVX-512: yes"; else echo "AVX-512: no"; fi
echo "setting: $setting; ${rounds} rounds; $(date -u '+%Y-%m-%d %H:%M UTC'); $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# One bench-one run of config $1 ("mode:px:batch"), with the setting when $2 is "with";
# appends its examples/s to $out/<config>.<with|without>.
run() {
    local mode px batch
    IFS=: read -r mode px batch <<< "$1"
    local cmd=(env MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483648)
    [ "$2" = with ] && cmd+=("$setting")
    local json
    json=$("${cmd[@]}" "$bin" bench-one --mode "$mode" --resize "$px" --batch "$batch" \
        --windows 3 --steps 2 --warmup 1 --algorithm winograd | tail -n 1)
    local eps=${json#*\"examples_per_sec\":}
    eps=${eps%%,*}
    [[ "$eps" =~ ^[0-9.eE+-]+$ ]] || { echo "bench-one printed no examples/s for $1: $json" >&2; exit 1; }
    echo "$eps" >> "$out/$1.$2"
}

for ((r = 1; r <= rounds; r++)); do
    for config in "${configs[@]}"; do
        if ((r % 2)); then order=(without with); else order=(with without); fi
        for side in "${order[@]}"; do run "$config" "$side"; done
    done
done

median() { sort -g "$1" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
list() { awk '{ printf "%s%.1f", (NR > 1 ? ", " : ""), $1 }' "$1"; }
printf '%-16s %12s %12s %8s\n' config without with ratio
for config in "${configs[@]}"; do
    a=$(median "$out/$config.without")
    b=$(median "$out/$config.with")
    printf '%-16s %12.1f %12.1f %7.3fx   (without: %s; with: %s)\n' "$config" "$a" "$b" \
        "$(awk -v a="$a" -v b="$b" 'BEGIN { print b / a }')" \
        "$(list "$out/$config.without")" "$(list "$out/$config.with")"
done
