#!/usr/bin/env bash
# Benchmarks that print ratios against a baseline measured in the same run.
#   (a) launch: lamcr run -n 32 /bin/true  vs  MPICH's mpiexec -n 32 /bin/true (median of 11,
#       alternating)
#   (b) forwarding: 1 rank writing 1 GiB through lamcr into /dev/null  vs  the same writer into a pipe
#       (median of 5, alternating; so is (c))
#   (c) 4 ranks x 256 MiB through lamcr  vs  4 writers into 4 pipes
#   (c') stderr and stdin: 1 GiB on one rank's stderr, and 1 GiB from the launcher's stdin into
#        rank 0, each  vs  the same bytes into a pipe (no target)
#   (d) checkpoint: 4 ranks x 256 MiB of touched memory, `lamcr checkpoint`  vs  `criu dump` of the
#       same holder tree with the same options (median of 5)
#   (e) restart: `lamcr restart` of that checkpoint until every rank runs  vs  `criu restore -d` of
#       the raw image (median of 3)
# Usage: bench/run.sh [--write-readme]   (BENCH_ONLY=launch|forward|ckpt: only (a), (b)-(c') or
# (d)-(e); BENCH_NOSETUP=1: skip set-up and build; BENCH_VERBOSE=1: print every sample)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${BENCH_NOSETUP:-}" ] || ./scripts/setup.sh
export PATH="/usr/local/sbin:$PATH"
[ -n "${BENCH_NOSETUP:-}" ] || cargo build --locked --release --quiet --bins --examples
L=$PWD/target/release/lamcr
COUNTER=$PWD/target/release/examples/counter
work=$(mktemp -d /tmp/lamcr-bench.XXXXXX)
job=
trap '[ -n "$job" ] && kill -KILL "$job" 2>/dev/null; rm -rf "$work"' EXIT
export LAMCR_RUN_DIR=$work/run LAMCR_CKPT_DIR=$work/ckpt

now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
time_ns() { local t0; t0=$(now); "$@" >/dev/null 2>&1; echo $(( $(now) - t0 )); }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
ms() { awk -v a="$1" 'BEGIN { printf "%.1f", a / 1e6 }'; }
# Waits (bounded) until the 4 children of $1 have touched their memory (RSS >= 250 MiB each).
wait_touched() {
    for _ in $(seq 200); do
        big=0
        for p in $(pgrep -P "$1"); do
            rss=$(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
            [ "${rss:-0}" -ge 256000 ] && big=$((big + 1))
        done
        [ "$big" -eq 4 ] && return
        sleep 0.05
    done
}
out=()
say() { printf '%s\n' "$*"; out+=("$*"); }

only() { [ -z "${BENCH_ONLY:-}" ] || [ "$BENCH_ONLY" = "$1" ]; }

if only launch; then
# (a) launch
for _ in 1 2; do "$L" run -n 32 /bin/true; mpiexec -n 32 /bin/true; done >/dev/null 2>&1
# Alternating runs, so that a drift in the machine's speed hits both the same.
ls=(); ms=()
for _ in $(seq 11); do
    ls+=("$(time_ns "$L" run -n 32 /bin/true)")
    ms+=("$(time_ns mpiexec -n 32 /bin/true)")
done
l=$(printf '%s\n' "${ls[@]}" | median); m=$(printf '%s\n' "${ms[@]}" | median)
[ -n "${BENCH_VERBOSE:-}" ] && echo "lamcr ${ls[*]} mpiexec ${ms[*]}" >&2
say "launch -n 32 /bin/true: lamcr $(ms "$l") ms, mpiexec $(ms "$m") ms, ratio $(ratio "$l" "$m")x (target <= 1.00)"
fi

if only forward; then
# (b) 1 GiB through one rank
# Median of 5 alternating pairs: one sample of either is at the mercy of the VM's neighbours.
pair_median() {  # $1 = direct command, $2 = lamcr command; sets direct and through
    local ds=() ts=()
    for _ in 1 2 3 4 5; do
        ds+=("$(time_ns sh -c "$1")"); ts+=("$(time_ns sh -c "$2")")
    done
    direct=$(printf '%s\n' "${ds[@]}" | median); through=$(printf '%s\n' "${ts[@]}" | median)
}
pair_median 'head -c 1073741824 /dev/zero | cat >/dev/null' "'$L' run -n 1 head -c 1073741824 /dev/zero >/dev/null"
say "forward 1 GiB, 1 rank: direct pipe $(awk -v n="$direct" 'BEGIN{printf "%.0f", 1024/(n/1e9)}') MiB/s, lamcr $(awk -v n="$through" 'BEGIN{printf "%.0f", 1024/(n/1e9)}') MiB/s, lamcr/direct throughput $(ratio "$direct" "$through") (target >= 0.80)"

# (c) 4 ranks x 256 MiB
pair_median 'for i in 1 2 3 4; do head -c 268435456 /dev/zero | cat >/dev/null & done; wait' "'$L' run -n 4 head -c 268435456 /dev/zero >/dev/null"
say "forward 4 x 256 MiB: direct $(awk -v n="$direct" 'BEGIN{printf "%.0f", 1024/(n/1e9)}') MiB/s, lamcr $(awk -v n="$through" 'BEGIN{printf "%.0f", 1024/(n/1e9)}') MiB/s, lamcr/direct throughput $(ratio "$direct" "$through")"

# stderr: 1 GiB on one rank's stderr, whose pipe keeps the default 64 KiB (no target; for the record)
pair_median 'head -c 1073741824 /dev/zero | cat >/dev/null' "'$L' run -n 1 sh -c 'exec head -c 1073741824 /dev/zero >&2' 2>/dev/null"
say "stderr 1 GiB, 1 rank: direct $(awk -v n="$direct" 'BEGIN{printf "%.0f", 1024/(n/1e9)}') MiB/s, lamcr $(awk -v n="$through" 'BEGIN{printf "%.0f", 1024/(n/1e9)}') MiB/s, lamcr/direct throughput $(ratio "$direct" "$through") (no target)"

# stdin: 1 GiB from the launcher's stdin into rank 0 (no target; for the record)
pair_median 'head -c 1073741824 /dev/zero | cat >/dev/null' "head -c 1073741824 /dev/zero | '$L' run -n 1 sh -c 'exec cat >/dev/null'"
say "stdin 1 GiB into rank 0: direct $(awk -v n="$direct" 'BEGIN{printf "%.0f", 1024/(n/1e9)}') MiB/s, lamcr $(awk -v n="$through" 'BEGIN{printf "%.0f", 1024/(n/1e9)}') MiB/s, lamcr/direct throughput $(ratio "$direct" "$through") (no target)"

fi

if only ckpt; then
# (d) checkpoint 4 x 256 MiB
"$L" run --engine criu -n 4 "$COUNTER" 100000 50 256 0 >/dev/null 2>&1 &
job=$!
for _ in $(seq 200); do
    lamd=$(pgrep -P "$job" -f 'lamcr lamd' | head -1 || true)
    holder=$( [ -n "$lamd" ] && pgrep -P "$lamd" -x lamcr-holder | head -1 || true)
    [ -n "$holder" ] && [ "$(pgrep -P "$holder" | wc -l)" -eq 4 ] && break
    sleep 0.05
done
wait_touched "$holder"
# Each measurement starts with no dirty pages (`sync`) and its images are deleted right after it:
# on this VM, writing into page cache that has never been used (or was handed back to the host) is
# several times slower than reusing freed pages, and that would punish whichever tool goes later.
# One unmeasured warm-up pair first; then 5 alternating pairs.
# Each rank's callback socket (fd 3, its peer is in lamd) is external, as lamcr declares it.
ext=()
for p in $(pgrep -P "$holder"); do
    ino=$(readlink "/proc/$p/fd/3" | tr -dc 0-9)
    ext+=(--external "unix[$ino]")
done
dump_raw() {
    rm -rf "$work/raw"; mkdir -p "$work/raw"; sync
    time_ns criu dump -t "$holder" -D "$work/raw" --leave-running "${ext[@]}" --tcp-established --network-lock nftables --ghost-limit 268435456 -o dump.log
    rm -rf "$work/raw"
}
dump_lamcr() {
    sync
    time_ns "$L" checkpoint "$job"
    rm -rf "$work"/ckpt/*/*
}
dump_lamcr >/dev/null; dump_raw >/dev/null
ck=(); raw=()
for i in 1 2 3 4 5; do
    if [ $((i % 2)) -eq 1 ]; then
        ck+=("$(dump_lamcr)"); raw+=("$(dump_raw)")
    else
        raw+=("$(dump_raw)"); ck+=("$(dump_lamcr)")
    fi
done
[ -n "${BENCH_VERBOSE:-}" ] && echo "lamcr ${ck[*]} raw ${raw[*]}" >&2
# The checkpoint (e) restarts from.
sync; "$L" checkpoint --term "$job" >/dev/null 2>&1
wait "$job" || true; job=
c=$(printf '%s\n' "${ck[@]}" | median); r=$(printf '%s\n' "${raw[@]}" | median)
say "checkpoint 4 x 256 MiB: lamcr $(ms "$c") ms, raw criu dump $(ms "$r") ms, ratio $(ratio "$c" "$r")x (target <= 1.10)"

# (e) restart 4 x 256 MiB: from `lamcr restart` until every rank runs again (its "restored" line;
#     the manifest and every image checksum are verified first)  vs  `criu restore -d` of the same
#     four ranks (same program, same memory) dumped from under a plain shell: the lamcr tree's
#     stdio pipes lead to lamd, so its image cannot be restored without lamd (median of 3)
epoch=$(ls -d "$work"/ckpt/*/* | tail -1)
rs=()
for i in 1 2 3; do
    sync
    t0=$(now)
    # Block on the restarted launcher's stderr (no polling loop stealing a core) until it says
    # every rank is restored.
    exec 3< <(exec "$L" restart "$epoch" 2>&1 >/dev/null)
    rj=$!
    while IFS= read -r line <&3; do
        case $line in *restored*) break ;; esac
    done
    rs+=("$(( $(now) - t0 ))")
    kill -TERM "$rj" 2>/dev/null || true
    cat <&3 >/dev/null || true
    exec 3<&-
done
# In a subshell that exits normally and whose stderr is /dev/null, so that bash has no "Killed"
# to report when CRIU kills the dumped tree.
( setsid sh -c "for r in 0 1 2 3; do LAMCR_RANK=\$r '$COUNTER' 100000 50 256 0 >/dev/null 2>&1 & done; wait" </dev/null >/dev/null 2>&1; exit 0 ) 2>/dev/null &
shjob=$!
for _ in $(seq 200); do
    sh_pid=$(pgrep -f "for r in 0 1 2 3" | head -1 || true)
    [ -n "$sh_pid" ] && break
    sleep 0.05
done
wait_touched "$sh_pid"
rm -rf "$work/raw"; mkdir -p "$work/raw"
criu dump -t "$sh_pid" -D "$work/raw" --tcp-established --network-lock nftables --ghost-limit 268435456 -o dump.log
wait "$shjob" || true   # the dumped (killed) tree is reaped: its pids must be free for the restores
# ...and its ranks, reparented to init: while any process keeps the session id, that pid is taken.
for _ in $(seq 500); do pgrep -s "$sh_pid" >/dev/null || break; sleep 0.01; done
rr=()
for i in 1 2 3; do
    sync
    rm -f "$work/pid"
    rr+=("$(time_ns criu restore -D "$work/raw" -d --pidfile "$work/pid" --tcp-established --ghost-limit 268435456 -o restore.log)")
    [ -s "$work/pid" ] || { echo "raw criu restore failed:"; grep Error "$work/raw/restore.log"; exit 1; }
    root=$(cat "$work/pid")
    kill -KILL -- "-$root" 2>/dev/null || true
    for _ in $(seq 500); do pgrep -s "$root" >/dev/null || break; sleep 0.01; done
done
c=$(printf '%s\n' "${rs[@]}" | median); r=$(printf '%s\n' "${rr[@]}" | median)
say "restart 4 x 256 MiB: lamcr $(ms "$c") ms, raw criu restore $(ms "$r") ms, ratio $(ratio "$c" "$r")x (target <= 1.10)"
fi

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
