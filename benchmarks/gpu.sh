#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run: the GPU tests, the `gpu` benchmark section and,
# with TRAIN=1, a GPU training stage of the shipped CNN models (continued from the shipped weights
# on fresh data; on an H200 in 2026-11 such a stage raised Z1's test R² by 0.003 and no other's).
#
#   [CHECKS=0] [TRAIN=1|compare|stream] bash benchmarks/gpu.sh OUTDIR [SECONDS]
#
# TRAIN=stream trains Z3 on patches made on the GPU as they are needed (below); CHECKS=0 skips the
# tests and benchmarks. TRAIN=compare instead trains Z3 from scratch twice on the same fresh set, the paper's ResNet-34
# (21 M parameters) and the shipped spectral network (1.6 M), for the same time each: whether a
# larger network pays, which continuing, averaging or specialising the shipped one no longer does
# (README, "Accuracy of the shipped models"). Both land in OUTDIR (Z3-ARCH.tar), none is shipped.
#
# OUTDIR receives the logs, RESULTS.md (with its GPU section) and one tar per trained model
# (lsfov/models/NAME.pt + .json); measure the models afterwards on the machine RESULTS.md describes
# (`python benchmarks/train_models.py NAME ... --evaluate`) and keep those that improved.
# SECONDS (default 540) bounds the whole run: training gets what the tests and benchmarks leave,
# and a model that cannot have a minute of it is skipped.
# The `--scheduler cuda` test needs dask-cuda, whose wheels (dask-cuda, cuda-core, nvidia-ml-py)
# travel in .whl/ with the others: it skips where they do not import.
# On a machine whose image has torch, CuPy, xarray, scikit-image and pandas but not the Dask and
# zarr stack (the H200s lent here, 2026-12), these wheels (cp312, manylinux x86_64, --no-deps; the
# versions of constraints-free `make install`) were enough, 16 MB in all:
#   dask distributed dask-cuda zarr numcodecs donfig google-crc32c ome-zarr ome-zarr-models
#   pydantic pydantic-core pydantic-zarr annotated-types typing-inspection tblib tornado zict
#   locket partd Deprecated lazy-importer rangehttpserver
# installed with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and
# PYTHONPATH=/tmp/site. The whole run took about 255 s (tests 100 s, benchmarks 150 s).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUTDIR [SECONDS]}
deadline=${2:-540}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
PY=${PYTHON:-python3}
start=$SECONDS

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 | tee "$out/gpu.log"
$PY -c "import torch, cupy; print('torch', torch.__version__, torch.cuda.get_device_name(0), '| cupy', cupy.__version__)" 2>&1 | tee -a "$out/gpu.log"

if [[ ${CHECKS:-1} == 1 ]]; then
    echo "=== GPU tests" | tee -a "$out/gpu.log"
    timeout 240 $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tail -25 | tee -a "$out/gpu.log"

    echo "=== gpu benchmark section" | tee -a "$out/gpu.log"
    timeout 240 $PY benchmarks/run.py gpu --iterations 10 2>&1 | tail -60 | tee -a "$out/gpu.log"
    cp benchmarks/RESULTS.md "$out/RESULTS.md"
fi

if [[ ${TRAIN:-0} == stream ]]; then
    # Z3 on patches made on the GPU as they are needed (lsfov.estimate.stream), 192 images per
    # procedural source: (1) the polar tail over the shipped fixed trunk, (2) then the whole
    # network at a low rate. Each stage lands in OUTDIR (Z3-tail.tar, Z3-whole.tar), none shipped.
    # On an H200 (2026-12-04, SECONDS 520): the tail 0.788 -> 0.792 in 14 M patches, the whole
    # network then 0.794 in 2.3 M; a second tail stage from the first, by hand (20 M patches at
    # lr 1e-4, benchmarks/train_models.py --stream), reached 0.796 and is the shipped Z3.
    each=$(( (deadline - (SECONDS - start) - 10) / 2 ))
    init=Z3
    for stage in "tail --freeze --arch polar --batch-size 1024 --lr 2e-4 --seed 61" "whole --batch-size 256 --lr 3e-5 --seed 62"; do
        set -- $stage
        name=$1; shift
        echo "=== Z3 $name on a stream at $((SECONDS - start)) s, $each s" | tee -a "$out/train.log"
        timeout "$each" $PY benchmarks/train_models.py Z3 --init "$init" "$@" --stream 100000000 --procedural "${PROCEDURAL:-192}" \
            --workers 15 --minutes "$(awk "BEGIN {print ($each - 90) / 60}")" --photons 500 5000 --no-measure 2>&1 \
            | tr '\r' '\n' | grep -v '^\s*$' | tail -3 | tee -a "$out/train.log" \
            && tar cf "$out/Z3-$name.tar" -C lsfov/models Z3.pt Z3.json && cp lsfov/models/Z3.pt /tmp/Z3-$name.pt \
            && init=/tmp/Z3-$name.pt
    done
    exit 0
fi

if [[ ${TRAIN:-0} == compare ]]; then
    each=$(( (deadline - (SECONDS - start) - 20) / 2 ))  # seconds per network: synthesis, training, one epoch over
    for arch in resnet34 spectral; do
        if (( each < 150 )); then echo "=== $arch skipped: time spent" | tee -a "$out/train.log"; continue; fi
        echo "=== train Z3 $arch from scratch at $((SECONDS - start)) s, $each s" | tee -a "$out/train.log"
        timeout "$each" $PY benchmarks/train_models.py Z3 --arch "$arch" --seed 21 --n 160000 --epochs 4 \
            --batch-size 256 --minutes "$(awk "BEGIN {print ($each - 120) / 60}")" --photons 500 5000 \
            --synth-device cuda --no-measure 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -4 | tee -a "$out/train.log" \
            && tar cf "$out/Z3-$arch.tar" -C lsfov/models Z3.pt Z3.json
    done
    exit 0
fi
[[ ${TRAIN:-0} == 1 ]] || exit 0
# Training: Z3 first (the weakest, and the one depth and blind deblurring use). Each stage: a fresh
# set, lr 3e-4 with cosine decay, photons as each model's last stage. Sized for about 6 min on an
# H200 (training ran at about 4 500 patches/s). The set's blur and noise run on the GPU
# (--synth-device cuda; 15 CPU processes made 900-2 400 patches/s there, the Zernike models the
# slower; one process with the GPU is bound by its crops and PSFs, about 4 500/s on this CPU).
for spec in "Z3 64000 1.0 500" "G2 48000 0.8 150" "Z1 48000 0.8 150" "G1 48000 0.8 150"; do
    set -- $spec
    left=$(( deadline - (SECONDS - start) - 10 ))
    if (( left < 60 )); then echo "=== $1 skipped: time spent" | tee -a "$out/train.log"; continue; fi
    echo "=== train $1 at $((SECONDS - start)) s" | tee -a "$out/train.log"
    timeout "$left" $PY benchmarks/train_models.py "$1" --init "$1" --seed 11 --n "$2" \
        --epochs 5 --lr 3e-4 --minutes "$3" --photons "$4" 5000 --synth-device cuda --no-measure 2>&1 \
        | tr '\r' '\n' | grep -v '^\s*$' | tail -4 | tee -a "$out/train.log" \
        && tar cf "$out/$1.tar" -C lsfov/models "$1.pt" "$1.json"
done
echo "=== done in $((SECONDS - start)) s" | tee -a "$out/train.log"
