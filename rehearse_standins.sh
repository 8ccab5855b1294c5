#!/usr/bin/env bash
# Scale rehearsal (issue 18): CIFAR-100, TinyImageNet and ImageNet-1k random-pixel stand-ins at their real image
# sizes and formats (datasets.write_standin, in a temporary folder that is deleted afterwards), each run end to
# end through train.py on CPU in one process and under torchrun with 2 gloo ranks. Results: results/rehearsal/.
# WIDTH=64 is full ResNet-18 width (one CIFAR task took ~7 min on 2 CPU cores, mostly the Shapley walk over
# N = 4800 neurons). SCORE=magnitude replaces the Shapley step by a cheap score (--importance): at 224 x 224
# and full width one ordering of the walk would take hours on a CPU (bench_train.py's coalitions/s).
# PERMS caps the Shapley orderings per task (default 2); RUNS picks the runs (default "single torchrun2").
# Usage: [WIDTH=8] [SCORE=magnitude] [PERMS=1] [RUNS=single] bash rehearse_standins.sh [DATASET ...] (default: all three).
set -euo pipefail
cd "$(dirname "$0")"
WIDTH=${WIDTH:-64}
SCORE=${SCORE:-shapley}
PERMS=${PERMS:-2}
RUNS=${RUNS:-single torchrun2}
mkdir -p results/rehearsal
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT
python -c "
import datasets as D; from pathlib import Path
root = Path('$DATA')
D.write_standin('cifar100', root, per_class=5)
D.write_standin('tinyimagenet', root, per_class=2)
D.write_standin('imagenet1k', root, per_class=10, classes=20)"
COMMON=(--num-tasks 2 --epochs 1 --mask-finetune-epochs 1 --max-permutations "$PERMS" --shapley-eval-batches 1
        --width "$WIDTH" --importance "$SCORE" --data-dir "$DATA" --device cpu --no-figures --overwrite --no-progress)
DATASETS=(cifar100 tinyimagenet imagenet1k)
(($#)) && DATASETS=("$@")
for dataset in "${DATASETS[@]}"; do
  out=results/rehearsal/${dataset}_w${WIDTH}
  [[ $SCORE == shapley ]] || out+=_$SCORE
  [[ $PERMS == 2 ]] || out+=_p$PERMS
  if [[ " $RUNS " == *" single "* ]]; then
    python train.py --dataset "$dataset" "${COMMON[@]}" --out-dir "${out}_single" 2>&1 | tee "${out}_single.log"
  fi
  if [[ " $RUNS " == *" torchrun2 "* ]]; then
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 train.py --dataset "$dataset" \
      "${COMMON[@]}" --dist-backend gloo --out-dir "${out}_torchrun2" 2>&1 | tee "${out}_torchrun2.log"
  fi
done
