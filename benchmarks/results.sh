#!/usr/bin/env bash
# The full benchmark of docs/results.md: both recipes, ten datasets, all presets, three seeds. Resumable: finished
# runs are stored in docs/results/<recipe>/runs.jsonl and never redone. One thread per process; run the two recipes
# in two shells to use both cores of the development machine.
set -euo pipefail
DATA=${DATA:-../shared/data}
DATASETS=${DATASETS:-digits,wine,breast-cancer,mnist1d,dna,satellite,letter,mnist,fashion-mnist,cifar10}
RULES=${RULES:-bp,fa,dfa,sal,sal-direct,sal-local,bp-areas,bp-wide}
recipe=${1:?usage: benchmarks/results.sh paper|tuned}
torchsal bench --protocol "$recipe" --datasets "$DATASETS" --presets "$RULES" --seeds 0,1,2 --data-dir "$DATA" \
               --threads 1 --out "docs/results/$recipe"
