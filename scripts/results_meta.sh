#!/usr/bin/env bash
# Leave-one-system-out results for one backbone (docs/results_meta.md).
#
# For each of the paper's four single-particle systems: meta-train (MAML) and pre-train the baseline on the
# other three (configs/meta_train_leave_<system>.yaml), then adapt the meta-trained, pre-trained and random
# models to fresh tasks of the held-out system (`metaham adapt`), and to laws that no split trains on (UNSEEN:
# three_body and the plugin systems of examples/). Finally rebuild docs/results_meta.md from every backbone
# measured so far under OUT_DIR. Re-running continues unfinished runs (--resume) and skips
# finished ones; hyper-parameters come from the shipped configs only (nothing is tuned on the held-out system).
#
#   scripts/results_meta.sh [BACKBONE] [OUT_DIR]                  defaults: gcn runs/results_meta
#   JOBS=2 TASKS=20 SHOTS=50 STEPS=50 scripts/results_meta.sh equivariant
#   SYSTEMS="pendulum" scripts/results_meta.sh gcn                 only some held-out systems
#   UNSEEN="three_body" scripts/results_meta.sh gcn                only some unseen laws ("": none)
#   SET="train.outer_steps=600" DOC=docs/results_meta_reduced.md scripts/results_meta.sh gcn runs/reduced
#                                       a reduced protocol (the document labels every departure from the configs)
#
# JOBS held-out systems run at once, one torch thread each (the fastest use of 2 cores for these models).
set -euo pipefail
cd "$(dirname "$0")/.."

BACKBONE=${1:-gcn}
OUT=${2:-runs/results_meta}
JOBS=${JOBS:-2}
TASKS=${TASKS:-20}
SHOTS=${SHOTS:-50}
STEPS=${STEPS:-50}
SET=${SET:-}
DOC=${DOC:-docs/results_meta.md}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
read -r -a SYSTEMS <<< "${SYSTEMS:-mass_spring pendulum henon_heiles magnetic_mirror}"
# Laws no leave-one-out split trains on: a system name, or PLUGIN_FILE:NAME for a plugin.
read -r -a UNSEEN <<< "${UNSEEN-three_body examples/coupled_quartic.py:coupled_quartic examples/duffing.py:duffing examples/morse_dimer.py:morse_dimer examples/penning_trap.py:penning_trap}"
export OMP_NUM_THREADS=1

overrides=(--set "model.backbone=$BACKBONE" --set threads=1)
for item in $SET; do overrides+=(--set "$item"); done
mkdir -p "$OUT/$BACKBONE"

# Simulate (or find cached) the four systems' task pools once, before the parallel jobs would race for them.
"$PYTHON" - "${overrides[@]}" <<'PY'
import sys
from metaham.meta.config import load_meta_config, task_config
from tasks import TaskDistribution
sets = [a for a in sys.argv[1:] if a != "--set"]
config = load_meta_config("configs/meta_train_leave_pendulum.yaml", sets)
TaskDistribution(["mass_spring", "pendulum", "henon_heiles", "magnetic_mirror"], task_config(config),
                 seed=config["data_seed"], progress=False)
PY

plot=()  # the plot needs metaham.viz.plot_adaptation (matplotlib)
"$PYTHON" -c "from metaham.viz import plot_adaptation" 2>/dev/null && plot=(--plot)

one() {  # meta-train, pre-train and adapt with SYSTEM held out; outputs in $OUT/$BACKBONE/leave_SYSTEM/
  local system=$1 dir="$OUT/$BACKBONE/leave_$1" resume=()
  # A finished held-out system is kept as it is (delete its folder to redo it).
  if [ -s "$dir/adapt.json" ]; then
    echo "already done: $BACKBONE, $system held out ($dir/adapt.json)"
  else
    [ -f "$dir/config.yaml" ] && resume=(--resume)
    "$PYTHON" -m metaham meta-train --config "configs/meta_train_leave_$system.yaml" "${overrides[@]}" \
      --out "$dir" "${resume[@]}" --no-progress --json > "$dir.train.log" 2>&1 || { echo "FAILED: training $system (see $dir.train.log)"; return 1; }
    tail -n 1 "$dir.train.log" > "$dir/train.json"
    "$PYTHON" -m metaham adapt --checkpoint "$dir" --system "$system" --shots "$SHOTS" --steps "$STEPS" \
      --tasks "$TASKS" ${plot[@]+"${plot[@]}" "$dir/adapt.png"} --no-progress --json > "$dir.adapt.log" 2>&1 || { echo "FAILED: adapting to $system (see $dir.adapt.log)"; return 1; }
    tail -n 1 "$dir.adapt.log" > "$dir/adapt.json"
    echo "done: $BACKBONE, $system held out ($(date +%H:%M:%S))"
  fi
  local law name plugin
  for law in ${UNSEEN[@]+"${UNSEEN[@]}"}; do  # the same checkpoints, adapted to laws no split trains on
    name=${law##*:} plugin=()
    [ "$name" != "$law" ] && plugin=(--plugin "${law%%:*}")
    [ -s "$dir/unseen_$name.json" ] && continue
    "$PYTHON" -m metaham adapt --checkpoint "$dir" ${plugin[@]+"${plugin[@]}"} --system "$name" --shots "$SHOTS" \
      --steps "$STEPS" --tasks "$TASKS" --no-progress --json > "$dir.unseen_$name.log" 2>&1 || { echo "FAILED: adapting to $name (see $dir.unseen_$name.log)"; return 1; }
    tail -n 1 "$dir.unseen_$name.log" > "$dir/unseen_$name.json"
  done
}

start=$(date +%s)
pids=()
for system in "${SYSTEMS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  one "$system" &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
echo "$BACKBONE: $(( $(date +%s) - start )) s wall clock"

"$PYTHON" scripts/results_meta_table.py "$OUT" --shots "$SHOTS" --steps "$STEPS" --tasks "$TASKS" --out "$DOC"
exit $failed
