#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in parts that each fit one 10-minute device
# call. Prepare the wheels first (bash tools/device_wheels.sh), then, on the device machine,
# from the repository root with `.whl` carried:
#
#   export DEPMATCH_COMMIT=<output of `git rev-parse HEAD` here>; bash tools/gpu_checks.sh PART [PART ...]
#
# (the device's copy of the tree may carry a .git of another commit; the ablation records this one).
# Results go to runs/gpu/ and, packed as one file after every command (a device call
# returns at most 8 files), to $OUT/gpu-PARTS.tar.gz; the tables are also printed.
#
#   perf      FIRST on a lent GPU: every speed target of #18 in ONE call of ≤ 7 minutes (tools/perf.py:
#             losses vs the original, S/B step profile, L/G MFU, ZeRO-2, UniMatch V2's own step) and a
#             table of the six targets. Prepare here with `bash tools/prepare_gpu_call.sh` (wheels and
#             the git-ignored .gpu-anchor/), which prints the call: carry .whl and .gpu-anchor,
#             timeout_s 480. `PERF_TINY=1 bash tools/gpu_checks.sh perf`: the same at tiny shapes on a CPU.
#   core      GPU tests, CUDA loss benchmark, loader + device augmentation, encoder swap
#             S/B/L x DepMatch off/on under ZeRO-2, DINOv2-L student MFU            (#3, #4, #6.1-6.4)
#   zero3     the same encoder swap under ZeRO-3, and S/B without DeepSpeed          (#3, #6.2, #6.3)
#   online    DepMatch step with Depth Anything (V2-Small shape) run on every step   (#6.2)
#   mem518    DINOv2-L/G peak memory at crop 518, ZeRO-2 / 3 / 3 + CPU offload       (#6.5)
#   mem798    the same at crop 798                                                   (#6.5)
#   memdinov3 DINOv3-L/H+ peak memory at crop 518 (512), ZeRO-2, beside the memory model's figures;
#             the check of `depmatch bench --memory-model` on DINOv3 (docs/benchmarks.md)   (#20)
#   losses    loss kernels: their CUDA tests, then triton (also compiled) vs blocked vs the loop reference,
#             one view at Pascal size, and the original code's functions where
#             ORIGINAL_DEPMATCH=path/to/DepMatch.py (the original repository's file) is set  (#10.3)
#   profile   tools/profile_step.py: kernel time vs wall, launches, syncs, top ops; S and L,
#             DepMatch off/on, eager and compiled (plain accelerate)                  (#10.1)
#   compile   bench S/B x DepMatch off/on x eager/compiled, plain accelerate          (#10.1, #10.2)
#   zero2c    bench S/B/L x DepMatch off/on compiled, and S eager, under ZeRO-2 with the
#             shipped launch/deepspeed/zero2.json                                     (#10.2, #10.5)
#   mfu       DINOv2-L student alone eager/compiled; L DepMatch off/on and G on, compiled,
#             plain accelerate                                                        (#10.2, #10.4)
#   ablate    the CDDP/ULDR ablation on scene version 4, `depmatch ablate --preset synthetic-gpu`: 45
#             DINOv2-S FixMatch runs, 8 at a time, into runs/gpu/ablate/; stopped at 5 minutes and summarised
#             (a rerun resumes) (#11, #19)
#
# Order of value if the budget is short: perf, core, mem518, zero3, mem798, online.
# The older split of #10's targets (each a call of its own, at most 8 min; perf replaces them):
# losses, profile, compile, zero2c, mfu.
set -uo pipefail
RESULTS=runs/gpu
mkdir -p "$RESULTS"
if [ -d .whl ] && ! python3 -c "import deepspeed, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# Compiled configurations reuse inductor's kernels across the bench's processes (not packed).
export TORCHINDUCTOR_CACHE_DIR=$PWD/runs/inductor-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RESULTS/gpu.txt" 2>&1
# (perf records the versions itself: importing deepspeed here would cost seconds of its 7 minutes)
[ "$*" = perf ] || python3 -c "import torch, timm, transformers, accelerate, deepspeed; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__)" >> "$RESULTS/gpu.txt" 2>&1
cat "$RESULTS/gpu.txt"

pack() {  # after every command, so that a call stopped at its time limit still returns what finished
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu-$PARTS.tar.gz" -C runs gpu; fi
}
PARTS=$(IFS=-; echo "$*")

bench() {  # bench NAME ARGS...: one `depmatch bench` into runs/gpu/NAME/ (its report grows per configuration)
  local name=$1; shift  # BENCH_LIMIT=SECONDS stops it there (0, the default: no limit)
  timeout "${BENCH_LIMIT:-0}" python3 -m depmatch bench --out "$RESULTS/$name" "$@" > "$RESULTS/$name.log" 2>&1
  grep -v "^\s*$" "$RESULTS/$name.log" | grep -E "^\||failed|Error" | tail -n 30
  pack
}

for part in "$@"; do
  echo "== $part $(date +%T)"
  case $part in
    core)
      timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -n 15 | tee "$RESULTS/gpu-tests.log"; pack
      timeout 240 python3 tools/bench_losses.py --device cuda --repeats 20 --json "$RESULTS/bench_losses_cuda.json" 2>&1 | tail -n 12; pack
      timeout 120 python3 tools/bench_loader.py --samples 200 --crop 518 --device cuda --batch 4 2>&1 | tee "$RESULTS/bench_loader.txt"; pack
      bench zero2 --encoders dinov2_s dinov2_b dinov2_l --depmatch off on --precision bf16 --zero 2 --crop 518
      bench student --encoders dinov2_l --depmatch off --scope student --precision bf16 --crop 518
      ;;
    zero3)
      bench zero3 --encoders dinov2_s dinov2_b dinov2_l --depmatch off on --precision bf16 --zero 3 --crop 518
      bench plain --encoders dinov2_s dinov2_b --depmatch off on --precision bf16 --crop 518
      ;;
    online)
      python3 tools/random_depth_anything.py /tmp/depth-anything-small-random
      bench online --encoders dinov2_s dinov2_b --depmatch on --precision bf16 --crop 518 \
        --set train.online_depth_model=/tmp/depth-anything-small-random
      ;;
    mem518 | mem798)  # the recipes' batches: 4 + 4 at 518 (Pascal), 2 + 2 at 798 (Cityscapes)
      batch=4; [ "$part" = mem798 ] && batch=2
      bench "$part" --encoders dinov2_l dinov2_g --depmatch on --precision bf16 --zero 2 3 3-offload \
        --crop "${part#mem}" --batch "$batch" --steps 3 --warmup 1
      ;;
    memdinov3)
      bench memdinov3 --encoders dinov3_l dinov3_h --depmatch on --precision bf16 --zero 2 --crop 518 --batch 4 \
        --steps 3 --warmup 1
      python3 -m depmatch bench --memory-model --encoders dinov3_l dinov3_h --gpus 1 --out "$RESULTS/memdinov3-model" \
        2>&1 | grep -E "^\| dinov3_. \| zero2" | tee "$RESULTS/memdinov3-model.txt"; pack
      ;;
    losses)  # the target: CDDP + ULDR fwd+bwd of one view (B=4) ≤ 1.5 ms and ≥ 100× the original functions
      timeout 180 python3 -m pytest -q -m gpu tests/test_gpu.py -k "losses or kernels" 2>&1 | tail -n 15 | tee "$RESULTS/gpu-tests-losses.log"; pack
      original=()
      if [ -n "${ORIGINAL_DEPMATCH:-}" ]; then original=(--original "$ORIGINAL_DEPMATCH"); else
        echo "ORIGINAL_DEPMATCH not set: compare 'per view (ms)' with the original functions' 105.5 + 58.4 ms on an H200" \
             "(2026-11-28, losses_vs_original.json of that run): ≥ 100× needs ≤ 1.64 ms" | tee "$RESULTS/bench_losses_kernels.note"
      fi
      timeout 270 python3 tools/bench_losses.py --device cuda --views 1 --repeats 50 --warmup 3 --reference-repeats 5 \
        --implementations triton compiled blocked reference ${original[@]+"${original[@]}"} --json "$RESULTS/bench_losses_kernels.json" 2>&1 | tail -n 12 | tee "$RESULTS/bench_losses_kernels.txt"; pack
      ;;
    profile)  # in one process, so later configurations reuse the compiled kernels; none starts after 330 s
      timeout 450 python3 tools/profile_step.py --encoders dinov2_s dinov2_l --depmatch off on --compile off on \
        --crop 518 --batch 4 --budget-s 330 --out "$RESULTS/profile" 2>&1 | grep -v "^\s*$" > "$RESULTS/profile.log"
      grep -E "^(dinov2|budget)" "$RESULTS/profile.log"; pack
      ;;
    compile)
      BENCH_LIMIT=450 bench compile-plain --encoders dinov2_s dinov2_b --depmatch off on --compile off on \
        --precision bf16 --crop 518 --steps 10 --warmup 3
      ;;
    zero2c)
      BENCH_LIMIT=330 bench compile-zero2 --encoders dinov2_s dinov2_b dinov2_l --depmatch off on --compile on \
        --zero 2 --precision bf16 --crop 518 --steps 10 --warmup 3
      BENCH_LIMIT=120 bench eager-zero2-s --encoders dinov2_s --depmatch off on --zero 2 --precision bf16 --crop 518
      ;;
    mfu)
      BENCH_LIMIT=200 bench mfu-student --encoders dinov2_l --depmatch off --scope student --compile off on \
        --precision bf16 --crop 518 --steps 8 --warmup 3
      BENCH_LIMIT=150 bench mfu-step-l --encoders dinov2_l --depmatch off on --compile on --precision bf16 \
        --crop 518 --steps 5 --warmup 3
      BENCH_LIMIT=110 bench mfu-step-g --encoders dinov2_g --depmatch on --compile on --precision bf16 \
        --crop 518 --steps 5 --warmup 3
      ;;
    ablate)
      # issue 19's plan on scene version 4; 5 minutes, so that it fits after `perf` in a lent GPU's 15;
      # the records of a plan cut off there are still summarised (a rerun resumes)
      ablate=(python3 -m depmatch ablate --preset synthetic-gpu --out "$RESULTS/ablate" --no-estimate --time-limit 270)
      timeout 300 "${ablate[@]}" > "$RESULTS/ablate.log" 2>&1 ||
        { echo "ablation stopped (exit $?): summarising the runs with a record"; "${ablate[@]}" --report-only >> "$RESULTS/ablate.log" 2>&1; }
      grep -E "runs planned|mIoU|^\|" "$RESULTS/ablate.log" | tail -n 60; pack
      ;;
    perf)  # every target of #18 in one call (tools/perf.py); it packs after each configuration itself
      tiny=() limit=400  # its 380 s budget, then the summary; with the install and start-up ≤ 7 minutes
      if [ -n "${PERF_TINY:-}" ]; then
        tiny=(--tiny) limit=0  # the CPU check at tiny shapes: no limit (its caps still apply)
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny ops on several threads only wait for each other
        python3 -c "import sys, torch; sys.exit(torch.cuda.is_available())" && export TRITON_INTERPRET=1
      fi
      pack_args=(); [ -n "${OUT:-}" ] && pack_args=(--pack "$OUT/gpu-$PARTS.tar.gz" --pack-dir "$RESULTS")
      timeout "$limit" python3 tools/perf.py ${tiny[@]+"${tiny[@]}"} --out "$RESULTS/perf" ${pack_args[@]+"${pack_args[@]}"} \
        > "$RESULTS/perf.log" 2>&1 || echo "perf exited with $? (runs/gpu/perf.log)"
      grep -E "^\[|^    " "$RESULTS/perf.log" | tail -n 40; cat "$RESULTS/perf/summary.md"; pack
      ;;
    *) echo "unknown part $part (perf, core, zero3, online, mem518, mem798, memdinov3, losses, profile, compile, zero2c, mfu, ablate)"; exit 2 ;;
  esac
done
