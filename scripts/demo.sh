#!/usr/bin/env bash
# A demo job: 4 ranks counting, checkpointed while they run, then restarted from the checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="/usr/local/sbin:$PATH"
cargo build --locked --release --quiet
lamcr=$PWD/target/release/lamcr
export LAMCR_CKPT_DIR=${LAMCR_CKPT_DIR:-$(mktemp -d /tmp/lamcr-demo.XXXXXX)}
echo "== lamcr check"
"$lamcr" check || true
echo "== a 4-rank job; each rank prints 20 numbered lines"
"$lamcr" run -n 4 --tag-output sh -c 'for i in $(seq 1 20); do echo "line $i"; sleep 0.1; done' &
job=$!
for _ in $(seq 50); do "$lamcr" ps | grep -q " $job " && break; sleep 0.1; done
sleep 0.5
echo "== lamcr checkpoint (the job keeps running)"
"$lamcr" checkpoint "$job"
wait "$job"
echo "== lamcr restart: the ranks continue from the checkpoint"
"$lamcr" restart "$LAMCR_CKPT_DIR"
echo "== done (checkpoints in $LAMCR_CKPT_DIR)"
