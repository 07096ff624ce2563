#!/usr/bin/env bash
# Benchmarks that print ratios against a baseline measured in the same run.
#   (a) launch: lamcr run -n 32 /bin/true  vs  MPICH's mpiexec -n 32 /bin/true (median of 7)
#   (b) forwarding: 1 rank writing 1 GiB through lamcr into /dev/null  vs  the same writer into a pipe
#   (c) 4 ranks x 256 MiB through lamcr  vs  4 writers into 4 pipes
#   (d) checkpoint: 4 ranks x 256 MiB of touched memory, `lamcr checkpoint`  vs  `criu dump` of the
#       same holder tree with the same options (median of 3)
# Usage: bench/run.sh [--write-readme]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="/usr/local/sbin:$PATH"
cargo build --locked --release --quiet --bins --examples
L=$PWD/target/release/lamcr
COUNTER=$PWD/target/release/examples/counter
work=$(mktemp -d /tmp/lamcr-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
export LAMCR_RUN_DIR=$work/run LAMCR_CKPT_DIR=$work/ckpt

now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
time_ns() { local t0; t0=$(now); "$@" >/dev/null 2>&1; echo $(( $(now) - t0 )); }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
ms() { awk -v a="$1" 'BEGIN { printf "%.1f", a / 1e6 }'; }
out=()
say() { printf '%s\n' "$*"; out+=("$*"); }

# (a) launch
for _ in 1 2; do "$L" run -n 32 /bin/true; mpiexec -n 32 /bin/true; done >/dev/null 2>&1
l=$(for _ in $(seq 7); do time_ns "$L" run -n 32 /bin/true; done | median)
m=$(for _ in $(seq 7); do time_ns mpiexec -n 32 /bin/true; done | median)
say "launch -n 32 /bin/true: lamcr $(ms "$l") ms, mpiexec $(ms "$m") ms, ratio $(ratio "$l" "$m")x (target <= 1.00)"

# (b) 1 GiB through one rank
direct=$(time_ns sh -c 'head -c 1073741824 /dev/zero | cat >/dev/null')
through=$(time_ns sh -c "'$L' run -n 1 head -c 1073741824 /dev/zero >/dev/null")
say "forward 1 GiB, 1 rank: direct pipe $(awk -v n="$direct" 'BEGIN{printf "%.0f", 1024/(n/1e9)}') MiB/s, lamcr $(awk -v n="$through" 'BEGIN{printf "%.0f", 1024/(n/1e9)}') MiB/s, lamcr/direct throughput $(ratio "$direct" "$through") (target >= 0.80)"

# (c) 4 ranks x 256 MiB
direct=$(time_ns sh -c 'for i in 1 2 3 4; do head -c 268435456 /dev/zero | cat >/dev/null & done; wait')
through=$(time_ns sh -c "'$L' run -n 4 head -c 268435456 /dev/zero >/dev/null")
say "forward 4 x 256 MiB: direct $(awk -v n="$direct" 'BEGIN{printf "%.0f", 1024/(n/1e9)}') MiB/s, lamcr $(awk -v n="$through" 'BEGIN{printf "%.0f", 1024/(n/1e9)}') MiB/s, lamcr/direct throughput $(ratio "$direct" "$through")"

# (d) checkpoint 4 x 256 MiB
"$L" run -n 4 "$COUNTER" 100000 50 256 0 >/dev/null 2>&1 &
job=$!
for _ in $(seq 200); do
    holder=$(pgrep -f 'lamcr holder' | head -1 || true)
    [ -n "$holder" ] && [ "$(pgrep -P "$holder" | wc -l)" -eq 4 ] && break
    sleep 0.05
done
# wait until the ranks have touched their memory (RSS >= 250 MiB each)
for _ in $(seq 200); do
    big=0
    for p in $(pgrep -P "$holder"); do
        rss=$(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        [ "${rss:-0}" -ge 256000 ] && big=$((big + 1))
    done
    [ "$big" -eq 4 ] && break
    sleep 0.05
done
ck=(); raw=()
for i in 1 2 3; do
    ck+=("$(time_ns "$L" checkpoint "$job")")
    mkdir -p "$work/raw$i"
    raw+=("$(time_ns criu dump -t "$holder" -D "$work/raw$i" --leave-running --tcp-established --network-lock nftables --ghost-limit 268435456 -o dump.log)")
    rm -rf "$work/raw$i" "$work"/ckpt/*/*
done
kill -TERM "$job"; wait "$job" || true
c=$(printf '%s\n' "${ck[@]}" | median); r=$(printf '%s\n' "${raw[@]}" | median)
say "checkpoint 4 x 256 MiB: lamcr $(ms "$c") ms, raw criu dump $(ms "$r") ms, ratio $(ratio "$c" "$r")x (target <= 1.10)"

if [ "${1:-}" = "--write-readme" ]; then
    {
        sed '/<!-- figures -->/q' README.md
        echo
        echo "Figures from \`bench/run.sh\` on $(date -u +%Y-%m-%d) ($(nproc) vCPU):"
        echo
        for line in "${out[@]}"; do echo "- $line"; done
    } > README.md.new
    mv README.md.new README.md
fi
