#!/usr/bin/env bash
# Every GPU check of captionkit in one bounded run, most important first (see benchmarks/gpu_checks.py).
#
# Why: a GPU is lent for minutes at a time; one prepared run must cover every check, each in
# its own process under `timeout`, so a failure or a hang costs that check only.
#
#   bash benchmarks/gpu_checks.sh cuda 2>&1 | tee gpu_log.txt   # full sizes (an H200 takes about 6 minutes)
#   bash benchmarks/gpu_checks.sh cpu  2>&1 | tee cpu_log.txt   # tiny sizes: proves the script runs
#   ONLY='busy|decode' bash benchmarks/gpu_checks.sh cuda         # only the checks whose names match
#
# PYTHON (default python3) runs the checks; captionkit must be importable (PYTHONPATH=src).
set -u
MODE=${1:-cuda}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/ck-gpu-checks}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rm -rf "$WORK"
mkdir -p "$WORK"
START=$(date +%s)

ONLY=${ONLY:-}
check() {  # check SECONDS NAME COMMAND...: one bounded check; its exit status is printed, never fatal
    local limit=$1 name=$2
    shift 2
    if [ -n "$ONLY" ] && ! [[ "$name" =~ $ONLY ]]; then
        return
    fi
    echo
    echo "===== [$name] start at +$(( $(date +%s) - START ))s (limit ${limit}s)"
    timeout -k 5 "$limit" "$@"
    local status=$?
    echo "===== [$name] exit $status$([ $status -eq 124 ] && echo ' (TIMED OUT)') at +$(( $(date +%s) - START ))s"
}

if [ "$MODE" = cuda ]; then
    DEV=cuda; DEVICES=cuda:0,cuda:0; SIZE=base; IMAGES=384; REF=128; W=12
    CONFIGS=fp32:32:sdpa:$W,bf16:32:sdpa:$W,bf16:64:sdpa:$W,fp16:32:sdpa:$W,bf16:32:eager:$W,bf16:32:sdpa:4
    TAG="--images 512 --batch-size 64 --workers $W"; TRAIN="--steps 40 --batch-size 16 --images 512 --repeats 3"
    TRAIN_MODES=full,lora,qlora
    PARITY=16; VLM_IMAGES=8; VLM_SIDE=384; SLOW=1
    BUSY="--size base --images 384 --batch-size 32 --image-size 1024 --repeats 2 --modes local ray devices-cuda:0"
    DECODE="--size base --images 256 --batch-size 32 --fixed 2 4 8 12 --repeats 2"
    nvidia-smi
else
    DEV=cpu; DEVICES=cpu,cpu; SIZE=tiny; IMAGES=12; REF=8; W=2
    CONFIGS=fp32:4:sdpa:$W,bf16:4:eager:$W
    TAG="--images 8 --batch-size 4 --workers $W"; TRAIN="--steps 4 --batch-size 4 --images 32"
    TRAIN_MODES=full,lora
    PARITY=6; VLM_IMAGES=4; VLM_SIDE=256; SLOW=4
    BUSY="--size tiny --images 48 --batch-size 4 --repeats 1 --modes local ray devices-cpu,cpu"
    DECODE="--size tiny --image-size 64 --images 48 --batch-size 4 --fixed 1 2 --repeats 1"
fi
check 60 versions "$PY" -c "
import importlib, importlib.util, os, sys
from captionkit._torchvision_compat import ensure_torchvision
ensure_torchvision()
import torch, transformers
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| transformers', transformers.__version__, '| cpus', os.cpu_count())
if torch.cuda.is_available():
    print('gpu', torch.cuda.get_device_name(0), '| bf16', torch.cuda.is_bf16_supported(),
          '| memory GiB', round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
for name in ('peft', 'accelerate', 'timm', 'simplejpeg', 'num2words', 'flash_attn', 'bitsandbytes'):
    try:
        version = getattr(importlib.import_module(name), '__version__', '?')
    except Exception as error:
        version = f'not importable ({type(error).__name__}: {str(error)[:200]})'
    print(f'  {name}: {version}')
"
check $((90 * SLOW)) prepare "$PY" "$HERE/gpu_checks.py" prepare --work "$WORK" --size $SIZE --images $IMAGES
check $((150 * SLOW)) "1 florence throughput" "$PY" "$HERE/gpu_checks.py" florence --work "$WORK" --device $DEV \
    --configs "$CONFIGS" --reference-images $REF --decode-workers $W
# shellcheck disable=SC2086
check $((240 * SLOW)) "1b busy: local vs ray vs devices" "$PY" "$HERE/executor_overhead.py" --device $DEV $BUSY
# shellcheck disable=SC2086
check $((150 * SLOW)) "1c decode workers: chosen vs fixed" "$PY" "$HERE/decode_workers.py" --device $DEV $DECODE
check $((45 * SLOW)) "2 parity" "$PY" "$HERE/gpu_checks.py" parity --work "$WORK" --device $DEV --images $PARITY
check $((60 * SLOW)) "3 devices" "$PY" "$HERE/gpu_checks.py" devices --work "$WORK" --device $DEV \
    --devices $DEVICES --images $PARITY
# shellcheck disable=SC2086
check $((60 * SLOW)) "4 tagger" "$PY" "$HERE/tag_throughput.py" --device $DEV $TAG
# Every mode in one process per precision, plain loop and trainer alternating (qlora: CUDA + bitsandbytes only)
# shellcheck disable=SC2086
check $((60 * SLOW)) "5 train fp32" "$PY" "$HERE/train_captioner_throughput.py" --device $DEV \
    --mixed-precision no --modes full --log-every 5 $TRAIN
# shellcheck disable=SC2086
check $((120 * SLOW)) "5 train bf16" "$PY" "$HERE/train_captioner_throughput.py" --device $DEV \
    --mixed-precision bf16 --modes "$TRAIN_MODES" --log-every 5 $TRAIN
check $((75 * SLOW)) "6 chat VLMs" "$PY" "$HERE/gpu_checks.py" vlms --work "$WORK" --device $DEV --dtype bf16 \
    --images $VLM_IMAGES --image-side $VLM_SIDE
[ "$MODE" = cuda ] && nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv
echo "===== all checks ended at +$(( $(date +%s) - START ))s"
