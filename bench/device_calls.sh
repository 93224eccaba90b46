#!/usr/bin/env bash
# The GPU checks of issue 9, cut into pieces that each fit one device call (600 s).
#
# Made here, carried to the device machine: `python bench/make_wheels.py` fills .wheels/ (check it
# with `python bench/check_wheels.py`); then a device call, with carry [".wheels"], runs
#
#   COMMIT=8c4d6f6 T=570 bash bench/device_calls.sh floors tests   # COMMIT: this tree's sha
#   T=570 bash bench/device_calls.sh table 8b 1,4     # speed table rows, four runners
#   RUNNERS=lorapool,unsloth T=570 bash bench/device_calls.sh table 1b,3b,8b 1,4  # two of them
#   T=570 bash bench/device_calls.sh grid             # estimate vs measured, short grid points
#   T=570 bash bench/device_calls.sh ablate 1b        # micro-batch 4: one fast piece off at a time
#   T=570 bash bench/device_calls.sh optim            # the optimizer step: per tensor vs packed
#   T=570 bash bench/device_calls.sh same             # fast vs reference path, 20 steps on 1B
#
# `floors`: the 3B job on a 3.5 GiB card and the 8B job on a 6.5 GiB card, each with its CUDA
# allocations traced (what is live at the peak). `tests`: the `-m gpu` tests of tests/train.
# Results go under $OUT/res/ (the call brings them back), one .txt and one folder per run; each
# piece prints a summary line, so the call's output tail says what passed. T is the call's time
# limit in seconds: table and grid launch no run they could not finish.
# The steps run in the order given; a failing step does not stop the next.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${OUT:?set OUT to the folder whose files come back}"
T=${T:-570}
start=$(date +%s)
left() { echo $(( T - ($(date +%s) - start) )); }
enough() {  # enough SECONDS: whether the call has that long left; says so when it has not
    [ "$(left)" -ge "$1" ] && return 0
    echo "$piece: skipped, $(left) s left of the call (needs $1)"
    return 1
}
R=$OUT/res
mkdir -p "$R"
# The device gets a copy of the working tree without .git, so the call names the commit.
echo "${COMMIT:-unknown}" > "$R/commit.txt"

bash bench/device_setup.sh > "$R/setup.txt" 2>&1 || { tail -20 "$R/setup.txt"; exit 1; }
echo "setup: $(( $(date +%s) - start )) s; $(head -1 "$R/setup.txt")"
nvidia-smi > "$R/nvidia-smi.txt" 2>&1 || true

floor() {  # floor SHAPE CARD_GIB: the job at seq 2048 within a small card's memory
    local out="$R/floor-$1-card$2"
    python bench/train_speed.py --card-gib "$2" --shapes "$1" --mb 1 --runners lorapool \
        --steps 6 --warmup 2 --memory-trace lorapool --out "$out" > "$out.txt" 2>&1
    echo "floor $1 on $2 GiB: $(grep -E '(PASS|FAIL).*floor driver' "$out.txt" || echo 'no verdict')"
}

while [ $# -gt 0 ]; do
    piece=$1; shift
    case $piece in
        floors)
            enough 120 && floor 3b 3.5
            enough 200 && floor 8b 6.5
            ;;
        tests)
            enough 120 || continue
            timeout $(( $(left) - 20 )) python -m pytest -m gpu tests/train -k "not two_gpus" -q \
                -p no:cacheprovider > "$R/gpu-tests.txt" 2>&1
            echo "gpu tests: $(tail -1 "$R/gpu-tests.txt")"
            ;;
        table)
            shapes=$1 mbs=$2; shift 2
            name="table-${shapes//,/-}-mb${mbs//,/-}"
            enough 200 || continue
            python bench/train_speed.py --shapes "$shapes" --mb "$mbs" --steps 6 --warmup 2 \
                --runners "${RUNNERS:-lorapool,unsloth,plain,liger}" --budget-s $(( $(left) - 100 )) \
                --out "$R/$name" > "$R/$name.txt" 2>&1
            echo "$name:"; grep -E "^(1b|3b|8b) " "$R/$name.txt"
            ;;
        ablate)
            # Where micro-batch 4 loses to Unsloth (0.80-0.97x, README): lorapool with one
            # piece off at a time, and a profile of the default, on SHAPE (1b by default). The
            # profiled run is slowed by the profiler (29k vs 40k tok/s on 1b, 2026-12-07):
            # lorapool@same is the default again, unprofiled, to compare the others with.
            # lorapool@shapes (graphs off, profiled) says which ops on which tensors take the
            # time: under a replayed graph the profiler sees kernels but not their ops. Unsloth,
            # profiled the same way, is the step to match, kernel by kernel.
            shape=${1:-1b}; [ $# -gt 0 ] && shift
            enough 200 || continue
            python bench/train_speed.py --shapes "$shape" --mb 4 --steps 6 --warmup 2 \
                --variant 'nooffload={"offload_activations": "off"}' \
                --variant 'nographs={"cuda_graphs": "off"}' \
                --variant 'nokernels={"kernels": "off"}' \
                --variant 'nogroup={"grouped_lora": "off"}' \
                --variant 'noflat={"flat_optimizer": "off"}' --variant 'same={}' \
                --variant 'shapes={"cuda_graphs": "off"}' \
                --runners lorapool,lorapool@shapes,unsloth,lorapool@same,lorapool@noflat,lorapool@nooffload,lorapool@nographs,lorapool@nokernels,lorapool@nogroup \
                --profile lorapool,lorapool@shapes,unsloth --budget-s $(( $(left) - 100 )) \
                --out "$R/ablate-$shape-mb4" > "$R/ablate-$shape-mb4.txt" 2>&1
            echo "ablate-$shape-mb4:"; grep -E "^(1b|3b|8b) " "$R/ablate-$shape-mb4.txt"
            ;;
        optim)
            # The optimizer step alone, one call per tensor vs packed (flat_optimizer).
            enough 60 || continue
            timeout $(( $(left) - 10 )) python bench/optimizer_step.py \
                --optimizers adamw_8bit,paged_adamw_8bit > "$R/optimizer-step.txt" 2>&1
            echo "optim:"; grep -E "^(1b|3b|8b) " "$R/optimizer-step.txt"
            ;;
        same)
            # Same numbers: the fast path against the reference path, 20 steps on 1B (per-step
            # loss within 1 %, the adapters' relative difference).
            enough 150 || continue
            timeout $(( $(left) - 10 )) python bench/train_speed.py --check-same \
                --check-steps 20 --out "$R/check-same" > "$R/check-same-1b.txt" 2>&1
            echo "same:"; grep -E "check-same|loss|adapter" "$R/check-same-1b.txt" | tail -4
            ;;
        grid)
            enough 200 || continue
            python bench/gpu_memory.py --subset all --seqs 512,2048 --mbs 1 --ranks 16 \
                --packed both --per-gpu 6 --budget-s $(( $(left) - 100 )) \
                > "$R/grid-short-points.txt" 2>&1
            echo "grid:"; tail -5 "$R/grid-short-points.txt"
            ;;
        *)
            echo "unknown piece: $piece (floors, tests, table SHAPES MBS, grid, ablate [SHAPE]," \
                 "optim, same)" >&2
            exit 2
            ;;
    esac
    echo "  ... $(( $(date +%s) - start )) s"
done
