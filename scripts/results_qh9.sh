#!/usr/bin/env bash
# QH9 model results (docs/results_qh9.md): the sparse model and its dense twin against trivial baselines, the
# eigen-aware loss ablated over seeds, and the split by molecule.
#
# 1. generate 312 conformers (12 small G2 molecules x 26 geometries) with QH9's pyscf settings;
# 2. score the trivial baselines (MINAO initial-guess Fock, per-molecule mean matrix) on the test split of
#    each split scheme used (dynamic-geo; dynamic-mol when a *_mol variant runs);
# 3. train each variant with configs/qh9.yaml (same epochs for all, one torch thread each, JOBS at a time);
# 4. evaluate each on its test split, with the SCF-acceleration metric (--scf), and on its val split;
# 5. rebuild docs/results_qh9.md from the JSON outputs (scripts/results_qh9_table.py; nothing typed by hand).
#
#   scripts/results_qh9.sh [OUT_DIR]                         default runs/results_qh9
#   VARIANTS="sparse dense sparse_raw dense_raw" JOBS=2 scripts/results_qh9.sh
#   VAL_ONLY=1 VARIANTS="sparse_a0.1_h1 sparse_a0.3_h1" scripts/results_qh9.sh   # choices made on val
#   scripts/results_qh9_size.sh                              # the sparse/dense-vs-data-size study (36 molecules)
#
# A variant is sparse or dense followed by any of these _-separated tokens:
#   raw        learn H itself (model.residual=false) instead of H - H_init
#   a<W>, v<W>, d<W>, h<W>  train.eigen_loss alignment / virtual / density / hinge weight W (e.g. a0.1, d1)
#   mol        QH9's dynamic-mol split (held-out molecules) instead of dynamic-geo (held-out conformers)
#   s<K>       train.seed K (default 0)
#   ep<N>      train.epochs N (default: the config's)
#   n<K>       data.max_train K: a fixed random subset of K training rows (the data-size study)
#   tp<X>, pair<X>  model.tp_sparsity / model.pair_sparsity X (tp0: the tensor-product gates keep every
#              path; pair0: the pair gates keep every pair)
# e.g. VARIANTS="sparse sparse_a0.1_h1 sparse_s1 sparse_a0.1_h1_s1 sparse_mol dense_raw".
#
# Re-running skips finished steps and resumes unfinished training runs (--resume).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/results_qh9}
JOBS=${JOBS:-2}
DOC=${DOC:-docs/results_qh9.md}
VAL_ONLY=${VAL_ONLY:-0}   # 1: score the val split only (choosing settings without looking at test)
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
read -r -a VARIANTS <<< "${VARIANTS:-sparse dense}"
MOLECULES=${MOLECULES:-H2O NH3 CH4 HF HCN H2CO C2H2 C2H4 CH3OH N2H4 H3CNH2 H2CF2}
CONFORMERS=${CONFORMERS:-26}
SCF=${SCF:-1}             # 0: no --scf on the test split (the data-size study: hundreds of larger molecules)
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
DATA="$OUT/${DATA_NAME:-small12.db}"

# shellcheck disable=SC2086
"$PYTHON" -m metaham qh9 generate --out "$DATA" --molecules $MOLECULES --conformers "$CONFORMERS" --workers 2 --json \
    > "$OUT/generate.json"
[ -s "$OUT/baseline.json" ] || "$PYTHON" -m metaham qh9 baseline --data "$DATA" --split test --json > "$OUT/baseline.json"
case " ${VARIANTS[*]} " in
    *_mol[_\ ]*) [ -s "$OUT/baseline_mol.json" ] || "$PYTHON" -m metaham qh9 baseline --data "$DATA" --split test \
        --split-by dynamic-mol --baselines minao --json > "$OUT/baseline_mol.json" ;;
esac

options() {  # the --set options of a variant (see the header)
    local token opts=() tokens
    IFS=_ read -r -a tokens <<< "$1"
    case ${tokens[0]} in
        sparse) ;;
        dense) opts+=(--set model.dense=true) ;;
        *) echo "unknown variant $1: it starts with sparse or dense" >&2; exit 2 ;;
    esac
    for token in "${tokens[@]:1}"; do
        case $token in
            raw) opts+=(--set model.residual=false) ;;
            mol) opts+=(--set data.split_by=dynamic-mol) ;;
            a[0-9]*) opts+=(--set "train.eigen_loss.alignment=${token#a}") ;;
            v[0-9]*) opts+=(--set "train.eigen_loss.virtual=${token#v}") ;;
            d[0-9]*) opts+=(--set "train.eigen_loss.density=${token#d}") ;;
            h[0-9]*) opts+=(--set "train.eigen_loss.hinge=${token#h}") ;;
            s[0-9]*) opts+=(--set "train.seed=${token#s}") ;;
            ep[0-9]*) opts+=(--set "train.epochs=${token#ep}") ;;
            n[0-9]*) opts+=(--set "data.max_train=${token#n}") ;;
            tp[0-9]*) opts+=(--set "model.tp_sparsity=${token#tp}") ;;
            pair[0-9]*) opts+=(--set "model.pair_sparsity=${token#pair}") ;;
            *) echo "unknown variant $1: no token $token (raw, a<W>, v<W>, d<W>, h<W>, mol, s<K>, ep<N>, n<K>, tp<X>, pair<X>)" >&2; exit 2 ;;
        esac
    done
    echo "${opts[@]}"
}

run_variant() {
    local variant=$1 run="$OUT/$1" resume=()
    [ -s "$OUT/eval_$variant.json" ] && return 0
    [ "$VAL_ONLY" = 1 ] && [ -s "$OUT/val_$variant.json" ] && return 0
    [ -f "$run/last.pt" ] && resume=(--resume)
    # shellcheck disable=SC2046
    "$PYTHON" -m metaham qh9 train --config configs/qh9.yaml --data "$DATA" --out "$run" --set threads=1 \
        $(options "$variant") "${resume[@]}" --json > "$OUT/train_$variant.json"
    [ -s "$OUT/val_$variant.json" ] ||
        "$PYTHON" -m metaham qh9 eval --checkpoint "$run" --split val --json > "$OUT/val_$variant.json"
    [ "$VAL_ONLY" = 1 ] && return 0
    local scf=()
    [ "$SCF" = 1 ] && scf=(--scf)
    "$PYTHON" -m metaham qh9 eval --checkpoint "$run" --split test "${scf[@]}" --json > "$OUT/eval_$variant.json.tmp"
    mv "$OUT/eval_$variant.json.tmp" "$OUT/eval_$variant.json"
}

for variant in "${VARIANTS[@]}"; do options "$variant" > /dev/null; done  # a misspelt variant fails first

running=0
for variant in "${VARIANTS[@]}"; do
    run_variant "$variant" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait

[ "$VAL_ONLY" = 1 ] || [ "${TABLE:-1}" = 0 ] && exit 0
"$PYTHON" scripts/results_qh9_table.py "$OUT" --size-dir "${SIZE_OUT:-runs/results_qh9_size}" --out "$DOC"
echo "wrote $DOC"
