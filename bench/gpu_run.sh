#!/usr/bin/env bash
# One script for a lent GPU machine: install, build the CUDA extension, run the GPU tests and the benchmarks,
# and leave everything under $OUT (at most a few files: logs, a results tarball, the demo snapshot).
#
#   bench/gpu_run.sh build tests core headline bench-kernels bench-model bench-sample bench-edm2 sweep det-a det-b fid demo:SECONDS
#
# Stages run in the order given; each one logs to $OUT/run.log and a failing stage does not stop the next.
# `demo:SECONDS` trains the built-in demo model in the background (from the start of the script) for that long.
# Reference vectors and the demo dataset travel in the git-ignored .gpu_carry/ folder (name it in `carry`);
# bench/gpu_prepare.sh makes it here, and the FID detector's two halves (.gpu_det_a, .gpu_det_b: see there).
# A lease: call 1 carries .gpu_carry + .gpu_det_a and runs `det-a build ...`; call 2, at once (the machine goes
# back after 30 s idle), carries .gpu_carry + .gpu_det_b and runs `det-b fid ...`; later calls carry .gpu_carry.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/edm_fast_out}
mkdir -p "$OUT/results"
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export EDM_FAST_REFERENCE_DIR="$PWD/.gpu_carry/reference" EDM_FAST_RESULTS_DIR="$OUT/results"
export EDM_FAST_COMMIT=${EDM_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || cat .gpu_carry/COMMIT 2>/dev/null || echo unknown)}
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$LOG"; }

demo_pid=""
for stage in "$@"; do
  case "$stage" in
    demo:*)
      secs=${stage#demo:}
      say "demo: training in the background for ${secs}s"
      ( timeout --signal=TERM --kill-after=60 "$secs" python train.py --outdir=/tmp/edm_demo --nosubdir \
          --data=.gpu_carry/digits-16x16.zip --cond=1 --arch=ddpmpp --cbase=32 --cres=1,2,2 --batch=256 \
          --duration=20 --lr=1e-3 --lr-rampup=100 --ema=0.2 --augment=0 --dropout=0.13 --tick=100 --snap=1 \
          --dump=5 --seed=0 --workers=2 --device=cuda --backend=reference > "$OUT/demo.log" 2>&1 ) &
      demo_pid=$!
      ;;
  esac
done

for stage in "$@"; do
  case "$stage" in
    build)
      say "build: python $(python -c 'import sys; print(sys.version.split()[0])'), torch $(python -c 'import torch; print(torch.__version__)')"
      timeout ${BUILD_TIMEOUT:-400} python -m pip install -e . --no-build-isolation --no-deps -v > "$OUT/build.log" 2>&1
      say "build exit $?"
      grep -E "edm_fast setup|error" "$OUT/build.log" | head -20 | tee -a "$LOG"
      python -m edm_fast 2>&1 | tee -a "$LOG"
      ;;
    tests)
      # One file at a time with its own limit, so a slow or hanging file does not hide the others' results;
      # several pytest workers where pytest-xdist is installed, so Triton's compiles (cold on a fresh machine)
      # run in parallel.
      say "tests: GPU-marked tests, file by file"
      par=""; python -c "import xdist" 2>/dev/null && par="-n ${XDIST:-4}"
      for f in ${TEST_FILES:-tests/ops/test_heun.py tests/ops/test_group_norm.py tests/ops/test_resample.py tests/ops/test_attention.py tests/ops/test_mp_attention.py tests/test_fast.py tests/test_augment.py bench/test_harness.py}; do
        timeout ${TEST_FILE_TIMEOUT:-150} python -m pytest -q $par -m gpu -p no:cacheprovider "$f" -rfE --tb=short \
          > "$OUT/tests_$(basename "$f" .py).log" 2>&1
        rc=$?; say "  $f exit $rc: $(tail -n 1 "$OUT/tests_$(basename "$f" .py).log")"
        grep -E "^(FAILED|ERROR)" "$OUT/tests_$(basename "$f" .py).log" | head -8 | cut -c1-200 | tee -a "$LOG"
      done
      ;;
    tests-all)
      say "tests-all: the whole suite on the GPU machine"
      python -m pytest -q -p no:cacheprovider tests/ -rfE --tb=short -x > "$OUT/tests_all.log" 2>&1; say "tests-all exit $?"
      tail -n 30 "$OUT/tests_all.log" | tee -a "$LOG"
      ;;
    bench-kernels)
      say "bench-kernels"
      python -m bench.run_all --only group_norm,resample,attention --quick --timeout 240 --out "$OUT/results" \
        > "$OUT/bench_kernels.log" 2>&1; say "bench-kernels exit $?"
      tail -n 60 "$OUT/bench_kernels.log" | tee -a "$LOG"
      ;;
    bench-model)
      say "bench-model"
      python -m bench.bench_model --quick --profile --out "$OUT/results" > "$OUT/bench_model.log" 2>&1
      say "bench-model exit $?"; tail -n 60 "$OUT/bench_model.log" | tee -a "$LOG"
      ;;
    bench-sample)
      say "bench-sample"
      python -m bench.bench_sample --out "$OUT/results" > "$OUT/bench_sample.log" 2>&1
      say "bench-sample exit $?"; tail -n 30 "$OUT/bench_sample.log" | tee -a "$LOG"
      ;;
    headline)
      # The numbers the README reports, within one lease: kernels (quick), DDPM++ CIFAR-10 and ADM networks,
      # DDPM++ CIFAR-10 sampling at NFE 35, each under its own time limit.
      say "headline benchmarks"
      R="$OUT/results"
      # the kernel timings below rely on harness.time_fn(kernel=True) hiding the host: check it first (~5 s)
      timeout 60 python -m pytest -q -m gpu -p no:cacheprovider bench/test_harness.py > "$OUT/harness.log" 2>&1
      say "harness check exit $?: $(tail -n 1 "$OUT/harness.log")"
      timeout 60 python -m bench.bench_group_norm --quick --out "$R" > "$OUT/b_gn.log" 2>&1; say "group_norm exit $?"
      timeout 50 python -m bench.bench_resample --quick --out "$R" > "$OUT/b_rs.log" 2>&1; say "resample exit $?"
      timeout 70 python -m bench.bench_attention --quick --out "$R" > "$OUT/b_at.log" 2>&1; say "attention exit $?"
      timeout 200 python -m bench.bench_model --models ddpmpp-cifar10 --providers reference,reference-compiled,fast-bf16 \
        --modes train,step --batches 512 --quick --out "$R" > "$OUT/b_m1.log" 2>&1; say "model ddpmpp exit $?"
      timeout 80 python -m bench.bench_model --models adm-imagenet64 --providers reference-fp16,fast-bf16 --modes forward \
        --batches 64 --quick --out "$R" > "$OUT/b_m2.log" 2>&1; say "model adm exit $?"
      timeout 90 python -m bench.bench_sample --models ddpmpp-cifar10 --out "$R" > "$OUT/b_s.log" 2>&1; say "sample exit $?"
      for f in b_gn b_rs b_at b_m1 b_m2 b_s; do tail -n 14 "$OUT/$f.log" | tee -a "$LOG"; done
      ;;
    core)
      # What a 15-minute lease can hold in one call (about 8 minutes; no CUDA build: the fused ops run through
      # Triton and SDPA): the harness check, the GroupNorm and resampling kernels, the DDPM++ CIFAR-10 training rate
      # (network and whole step) and NFE-35 sampling rate against the NVlabs-style reference, ADM forward MFU.
      say "core benchmarks (15-minute lease)"
      R="$OUT/results"
      timeout 40 python -m pytest -q -m gpu -p no:cacheprovider bench/test_harness.py > "$OUT/harness.log" 2>&1
      say "harness check exit $?: $(tail -n 1 "$OUT/harness.log")"
      timeout 50 python -m bench.bench_group_norm --quick --providers reference,reference-compiled,triton --out "$R" \
        > "$OUT/b_gn.log" 2>&1; say "group_norm exit $?"
      timeout 40 python -m bench.bench_resample --quick --out "$R" > "$OUT/b_rs.log" 2>&1; say "resample exit $?"
      timeout 200 python -m bench.bench_model --models ddpmpp-cifar10 --providers reference,fast-bf16 \
        --modes train,step --batches 512 --quick --out "$R" > "$OUT/b_m1.log" 2>&1; say "model ddpmpp exit $?"
      timeout 100 python -m bench.bench_sample --models ddpmpp-cifar10 --out "$R" > "$OUT/b_s.log" 2>&1; say "sample exit $?"
      timeout 60 python -m bench.bench_model --models adm-imagenet64 --providers reference-fp16,fast-bf16 --modes forward \
        --batches 64 --quick --out "$R" > "$OUT/b_m2.log" 2>&1; say "model adm exit $?"
      for f in b_gn b_rs b_m1 b_s b_m2; do tail -n 14 "$OUT/$f.log" | tee -a "$LOG"; done
      ;;
    bench-edm2)
      # EDM2-S ImageNet-64: network forward/train and 32-step sampling, NVlabs-style reference vs the fast path.
      say "bench-edm2"
      R="$OUT/results"
      timeout 240 python -m bench.bench_model --models edm2-img64-s --providers reference,fast-bf16,fast-fp16 \
        --quick --out "$R" > "$OUT/b_e2m.log" 2>&1; say "edm2 model exit $?"
      timeout 150 python -m bench.bench_sample --models edm2-img64-s --out "$R" > "$OUT/b_e2s.log" 2>&1
      say "edm2 sample exit $?"
      for f in b_e2m b_e2s; do tail -n 14 "$OUT/$f.log" | tee -a "$LOG"; done
      ;;
    sweep)
      # Triton tile settings: the best per kernel family next to the default (CONFIG in edm_fast/ops/triton/*.py).
      say "sweep"
      timeout 240 python -m bench.bench_group_norm --quick --sweep --providers reference-compiled,triton \
        --out "$OUT/results" > "$OUT/sweep_gn.log" 2>&1; say "group_norm sweep exit $?"
      timeout 200 python -m bench.bench_resample --quick --sweep --out "$OUT/results" > "$OUT/sweep_rs.log" 2>&1
      say "resample sweep exit $?"
      for f in sweep_gn sweep_rs; do grep -A4 "sweep" "$OUT/$f.log" | tail -n 8 | tee -a "$LOG"; done
      ;;
    det-a)
      mkdir -p .gpu_keep && cp .gpu_det_a/default_1.pt.part0 .gpu_keep/ && say "det-a: first half kept" \
        || say "det-a: no .gpu_det_a (carry it; bench/gpu_prepare.sh makes it)"
      ;;
    det-b)
      if [ -f .gpu_keep/default_1.pt.part0 ] && [ -f .gpu_det_b/default_1.pt.part1 ]; then
        cat .gpu_keep/default_1.pt.part0 .gpu_det_b/default_1.pt.part1 > .gpu_keep/default_1.pt
        got=$(sha1sum .gpu_keep/default_1.pt | cut -d' ' -f1)
        [ "$got" = "$(cat .gpu_det_b/SHA1)" ] && say "det-b: detector joined, SHA-1 $got" \
          || { say "det-b: SHA-1 $got does not match"; rm -f .gpu_keep/default_1.pt; }
      else
        say "det-b: a half is missing (det-a must run on this same warm machine first, carrying .gpu_det_a)"
      fi
      ;;
    fid)
      # FID and images/s of the demo model against its training set (CPU: FID 5.91 over seeds 0-1796), then
      # images/s at 50,000 images, then bench_fid (detector precision, throughput, overlap).
      D=.gpu_keep/default_1.pt
      if [ ! -f "$D" ]; then say "fid: no detector at $D (stages det-a, then det-b)"; continue; fi
      say "fid"
      R="$OUT/results"
      net=edm_fast/assets/demo-digits-16x16.safetensors
      timeout 120 python fid.py ref --data=.gpu_carry/digits-16x16.zip --dest=/tmp/digits-ref.npz --detector=$D \
        > "$OUT/fid_ref.log" 2>&1; say "fid ref exit $?"
      timeout 120 python fid.py gen --network=$net --ref=/tmp/digits-ref.npz --seeds=0-1796 --detector=$D \
        --out "$R/fid_demo.jsonl" > "$OUT/fid_gen.log" 2>&1; say "fid gen 1797 exit $?"
      timeout 200 python fid.py gen --network=$net --ref=/tmp/digits-ref.npz --num=50000 --detector=$D \
        --out "$R/fid_demo.jsonl" > "$OUT/fid_gen50k.log" 2>&1; say "fid gen 50k exit $?"
      timeout 240 python -m bench.bench_fid --quick --detector $D --out "$R" > "$OUT/b_fid.log" 2>&1
      say "bench_fid exit $?"
      for f in fid_gen fid_gen50k b_fid; do tail -n 12 "$OUT/$f.log" | tee -a "$LOG"; done
      ;;
    demo:*) ;;
    *) say "unknown stage $stage" ;;
  esac
done

if [ -n "$demo_pid" ]; then
  say "waiting for the demo training"
  wait "$demo_pid"
  tail -n 5 "$OUT/demo.log" | tee -a "$LOG"
  last=$(ls /tmp/edm_demo/network-snapshot-*.safetensors 2>/dev/null | tail -n 1)
  [ -n "$last" ] && cp "$last" "$OUT/demo-snapshot.safetensors" && say "demo snapshot: $last"
  cp /tmp/edm_demo/stats.jsonl "$OUT/demo-stats.jsonl" 2>/dev/null
fi
python -m bench.chart --results "$OUT/results" > /dev/null 2>&1 && mv "$OUT/results/speedups.png" "$OUT/" 2>/dev/null
tar -czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
say "done"
# At most 8 files come back: run.log, logs.tgz, results.tgz, speedups.png, demo-snapshot, demo-stats.
(cd "$OUT" && tar -czf logs.tgz --remove-files $(ls *.log | grep -v '^run.log$') 2>/dev/null)
