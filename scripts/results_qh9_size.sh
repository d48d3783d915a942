#!/usr/bin/env bash
# Sparse model vs dense twin as the training set grows (docs/results_qh9.md, "Sparse vs dense vs data size").
#
# 36 G2 molecules (the smallest by def2-SVP orbitals, 10-70), 40 conformers each, QH9's pyscf settings; QH9's
# dynamic-geo split (held-out conformers); the sparse model and its dense twin trained with configs/qh9.yaml
# (40 epochs) on fixed random subsets of SIZES training rows, scored on the whole test split (no --scf: the
# SCF metric is in the main results). Resumable like scripts/results_qh9.sh, which it runs:
#
#   scripts/results_qh9_size.sh [OUT_DIR]                 default runs/results_qh9_size
#   SIZES="288 1152" JOBS=2 scripts/results_qh9_size.sh
#   EXTRA="..."  also trains these variants on the same data; by default, at the largest size: the eigen-loss
#                weighting chosen on the small set's val split (seeds 0 and 1, and the plain model's seed 1), and
#                the sparse model with one kind of gate off (tp0: no tensor-product path dropped; pair0: no pair
#                dropped) to see where its accuracy goes
#
# Then scripts/results_qh9_table.py MAIN_OUT --size-dir OUT_DIR rebuilds the doc (done here for the default dirs).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/results_qh9_size}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MOLECULES="H2 HF CH2_s1A1d H2O CO F2 N2 NH3 HCN CH4 C2H2 H2CO H2O2 CO2 F2O N2O O3 C2H4 CH3OH N2H4 H2CCO H2CF2
HCOOH H3CNH2 COF2 NCCN NF3 CH3CN H2CCHF C2H6 HCF3 C3H4_C2v C3H4_C3v C3H4_D2d CH2OCH2 CH3CHO"
read -r -a SIZES <<< "${SIZES:-288 576 1152}"
variants=()
for n in "${SIZES[@]}"; do variants+=("sparse_n$n" "dense_n$n"); done
if [ -n "${EXTRA+set}" ]; then
    read -r -a extra <<< "$EXTRA"
else
    extra=(sparse_a0.01_h0_n1152 sparse_a0.01_h0_s1_n1152 sparse_s1_n1152 sparse_tp0_n1152 sparse_pair0_n1152)
fi
variants+=("${extra[@]}")

MOLECULES=$(echo $MOLECULES) CONFORMERS=40 DATA_NAME=g2_36.db SCF=0 TABLE=0 VARIANTS="${variants[*]}" \
    scripts/results_qh9.sh "$OUT"
if [ "$OUT" = runs/results_qh9_size ] && [ -s runs/results_qh9/generate.json ]; then
    "$PYTHON" scripts/results_qh9_table.py runs/results_qh9 --size-dir "$OUT" --out docs/results_qh9.md > /dev/null
    echo "wrote docs/results_qh9.md"
fi
