#!/usr/bin/env bash
# QH9 model results (docs/results_qh9.md): the sparse model and its dense twin against trivial baselines.
#
# 1. generate 312 conformers (12 small G2 molecules x 26 geometries) with QH9's pyscf settings;
# 2. score the trivial baselines (MINAO initial-guess Fock, per-molecule mean matrix) on the test split;
# 3. train each variant with configs/qh9.yaml (same epochs for all, one torch thread each, JOBS at a time);
# 4. evaluate each on the test split (QH9's dynamic-geo split: held-out conformers of seen molecules);
# 5. rebuild docs/results_qh9.md from the JSON outputs (scripts/results_qh9_table.py; nothing typed by hand).
#
#   scripts/results_qh9.sh [OUT_DIR]                         default runs/results_qh9
#   VARIANTS="sparse dense sparse_raw dense_raw" JOBS=2 scripts/results_qh9.sh
#
# Re-running skips finished steps and resumes unfinished training runs (--resume).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/results_qh9}
JOBS=${JOBS:-2}
DOC=${DOC:-docs/results_qh9.md}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
read -r -a VARIANTS <<< "${VARIANTS:-sparse dense}"
MOLECULES="H2O NH3 CH4 HF HCN H2CO C2H2 C2H4 CH3OH N2H4 H3CNH2 H2CF2"
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
DATA="$OUT/small12.db"

# shellcheck disable=SC2086
"$PYTHON" -m metaham qh9 generate --out "$DATA" --molecules $MOLECULES --conformers 26 --workers 2 --json \
    > "$OUT/generate.json"
[ -s "$OUT/baseline.json" ] || "$PYTHON" -m metaham qh9 baseline --data "$DATA" --split test --json > "$OUT/baseline.json"

options() {  # the --set options of a variant
    case "$1" in
        sparse) echo "" ;;
        dense) echo "--set model.dense=true" ;;
        sparse_raw) echo "--set model.residual=false" ;;
        dense_raw) echo "--set model.dense=true --set model.residual=false" ;;
        *) echo "unknown variant $1" >&2; exit 2 ;;
    esac
}

run_variant() {
    local variant=$1 run="$OUT/$1" resume=()
    [ -s "$OUT/eval_$variant.json" ] && return 0
    [ -f "$run/last.pt" ] && resume=(--resume)
    # shellcheck disable=SC2046
    "$PYTHON" -m metaham qh9 train --config configs/qh9.yaml --data "$DATA" --out "$run" --set threads=1 \
        $(options "$variant") "${resume[@]}" --json > "$OUT/train_$variant.json"
    "$PYTHON" -m metaham qh9 eval --checkpoint "$run" --split test --json > "$OUT/eval_$variant.json"
}

running=0
for variant in "${VARIANTS[@]}"; do
    run_variant "$variant" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait

"$PYTHON" scripts/results_qh9_table.py "$OUT" --out "$DOC"
echo "wrote $DOC"
