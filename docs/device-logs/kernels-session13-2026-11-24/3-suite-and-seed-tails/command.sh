set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
mkdir -p /tmp/pkg/ttt_video; echo "__path__ = ['$PWD']" > /tmp/pkg/ttt_video/__init__.py
export PYTHONPATH=/tmp/pkg PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 300 python3 benchmarks/precision_seeds.py --shape 2,3,640,64,64,4 --seeds 150 --seed0 2000 --json $OUT/seeds-640.json > $OUT/seeds-640.log 2>&1 &
timeout 300 python3 benchmarks/precision_seeds.py --shape 1,3,192,32,32,2 --seeds 100 --seed0 2000 --config 'mlp_fwd:variant=split' --split-any-shape --json $OUT/seeds-d32.json > $OUT/seeds-d32.log 2>&1 &
TEST_TIMEOUT=330 SKIP_BENCH=1 bash scripts/device_kernels.sh
wait; echo "all done $(( $(date +%s)-t0 ))s"
for f in $OUT/seeds-*.log; do echo "== $f"; tail -2 $f; grep "^repo " $f | awk "{print \$7}" | sort -g | tail -5 | tr '\n' ' '; echo; done
