#!/usr/bin/env bash
# Everything the one device call of `tools/gpu_checks.sh perf` carries, built here, then the call to make.
#
#   UNIMATCH_V2_GIT=/path/to/LiheYoung/UniMatch-V2.git DEPMATCH_GIT=/path/to/PixelSegTech/DepMatch.git \
#       bash tools/prepare_gpu_call.sh
#
# The two variables name bare git snapshots of the public repositories (a session's `fetch` of
# github:LiheYoung/UniMatch-V2 and github:PixelSegTech/DepMatch returns such a folder; without the
# variables the /work/.mirror copies are used when present). Writes, all git-ignored, never committed:
#   .whl/                       the wheels the device lacks (tools/device_wheels.sh)
#   .gpu-anchor/unimatch_v2_step.py   the peer's timing script (../shared does not travel)
#   .gpu-anchor/um2_snapshot/   its snapshot of both repositories (the original DepMatch.py inside:
#                               um2_snapshot/depmatch/DepMatch.py, which perf's losses item times too)
set -euo pipefail
cd "$(dirname "$0")/.."
ANCHOR_SCRIPT=${ANCHOR_SCRIPT:-../shared/anchors/unimatch_v2_step.py}
export UNIMATCH_V2_GIT=${UNIMATCH_V2_GIT:-/work/.mirror/LiheYoung+UniMatch-V2/repo}
export DEPMATCH_GIT=${DEPMATCH_GIT:-/work/.mirror/PixelSegTech+DepMatch/repo}
for repo in "$UNIMATCH_V2_GIT" "$DEPMATCH_GIT"; do
  git -C "$repo" rev-parse HEAD > /dev/null 2>&1 ||
    { echo "$repo: not a git snapshot; fetch github:LiheYoung/UniMatch-V2 and github:PixelSegTech/DepMatch and set UNIMATCH_V2_GIT / DEPMATCH_GIT" >&2; exit 2; }
done
[ -f "$ANCHOR_SCRIPT" ] || { echo "$ANCHOR_SCRIPT: missing; set ANCHOR_SCRIPT to unimatch_v2_step.py" >&2; exit 2; }
git check-ignore -q .gpu-anchor/ || { echo ".gpu-anchor is not git-ignored: refusing to write third-party code there" >&2; exit 2; }

[ -d .whl ] && [ -n "$(ls .whl/deepspeed-*.whl 2>/dev/null)" ] || bash tools/device_wheels.sh > /dev/null
rm -rf .gpu-anchor && mkdir -p .gpu-anchor
cp "$ANCHOR_SCRIPT" .gpu-anchor/unimatch_v2_step.py
python .gpu-anchor/unimatch_v2_step.py --prepare .gpu-anchor/um2_snapshot > /dev/null
[ -f .gpu-anchor/um2_snapshot/depmatch/DepMatch.py ] || { echo "the snapshot has no depmatch/DepMatch.py" >&2; exit 1; }
echo "carried: .whl ($(du -sh .whl | cut -f1)), .gpu-anchor ($(du -sh .gpu-anchor | cut -f1)); sources $(tr -d '\n ' < .gpu-anchor/um2_snapshot/SOURCES.json)"
if [ -n "$(git status --porcelain)" ]; then echo "warning: the tree has uncommitted changes; commit them first so the commit below is what runs" >&2; fi
cat <<CALL
The device call (one; about 7 minutes; then give_back unless a rerun follows at once):
  run(command="DEPMATCH_COMMIT=$(git rev-parse --short HEAD) bash tools/gpu_checks.sh perf",
      carry=[".whl", ".gpu-anchor"], timeout_s=480)
Its results: runs/gpu/perf/summary.md (printed last), packed in \$OUT/gpu-perf.tar.gz.
CALL
