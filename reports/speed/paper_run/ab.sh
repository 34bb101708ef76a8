#!/bin/bash
# On the GPU machine, in one call: a coarse + fine run under two settings, A and B, on one machine
# and one compile cache, so that their steady ms per iteration compare (session 16 compared runs
# across machines and saw ±2 ms). Both fine stages refine the same mesh: B's fine stage runs on a
# copy of A's coarse field. speed.json of each (A_coarse_fine.json: A's coarse and fine;
# B.json: B's coarse, and B's fine on A's field) and the logs' ends come back in $OUT.
#   bash reports/speed/paper_run/ab.sh "A options" "B options" [COARSE] [FINE]
# e.g. ab.sh "" "--set sd.vae_graphs=true --set zero123.vae_graphs=true" 400 300   (~6.5 min on an H200)
# Env: D (default /tmp/ab), PRESET, MODELS, EXTRA (options both get, e.g. --tiny to check it on a CPU);
# A_DIR, B_DIR: the source tree each side runs from (default: this one), for an A/B of two commits, e.g.
#   git archive 21cf978 | (mkdir -p .diag/old && tar x -C .diag/old)   # here; carry .diag/old to the GPU machine
#   B_DIR=.diag/old bash reports/speed/paper_run/ab.sh "" "" 200 150   # A: this tree, B: 21cf978's
# (python3 -m puts the run's own tree first on sys.path, ahead of a PYTHONPATH naming this one)
# PRIORS: options both sides get first (default none: the priors' defaults, compile auto = graphs on a GPU with
# two streams; before session 34 this script set sd/zero123.compile=reduce-overhead, the default then)
A=${1:-}; B=${2:-}; C=${3:-400}; F=${4:-300}
D=${D:-/tmp/ab}; mkdir -p $D
export PYTHONUNBUFFERED=1
run() {  # run OUT STAGE OPTIONS…
  local out=$1 stage=$2 dir=${A_DIR:-.}; shift 2
  [ "${out##*/}" = a ] || dir=${B_DIR:-.}
  (cd $dir && timeout ${LIMIT:-280} python3 -m flows.cli bench speed --preset ${PRESET:-magic123} --models-dir ${MODELS:-/tmp/models} \
    ${PRIORS:-} --set coarse.iters=$C --set fine.iters=$F ${EXTRA:-} --compile-cache $D/cc.bin "$@" \
    --stages $stage --out $out) > $D/${out##*/}_$stage.log 2>&1
  local rc=$?  # before anything else runs: a command substitution would reset $?
  echo "${out##*/} $stage rc $rc"
  tr '\r' '\n' < $D/${out##*/}_$stage.log | grep -E '^(stage|coarse|fine) ' | tail -2
}
run $D/a coarse $A
cp -r $D/a $D/b_fine_on_a
run $D/b coarse $B
run $D/a fine $A
run $D/b_fine_on_a fine $B
mkdir -p ${OUT:-$D/out}
cp $D/a/speed.json ${OUT:-$D/out}/A_coarse_fine.json 2>/dev/null
python3 - "$D" "${OUT:-$D/out}" <<'EOF'
import json, sys
from pathlib import Path
d, out = Path(sys.argv[1]), Path(sys.argv[2])
try:
    b = json.loads((d / "b" / "speed.json").read_text())
    b["stages"]["fine"] = json.loads((d / "b_fine_on_a" / "speed.json").read_text())["stages"]["fine"]
    b["note"] = "coarse: B's own run; fine: B's settings on a copy of A's coarse field (ab.sh)"
    (out / "B.json").write_text(json.dumps(b, indent=1))
except (OSError, KeyError, ValueError) as e:
    print(f"B.json not written: {type(e).__name__}: {e}")
EOF
for f in $D/*.log; do g=${f##*/}; tr '\r' '\n' < $f | grep -v -E '(it/s|s/it)(, [^]]*)?\]$' | tail -15 > ${OUT:-$D/out}/${g%.log}_tail.txt; done
ls ${OUT:-$D/out}
