#!/bin/bash
# One call on the GPU machine: models.compile_cache on a machine whose own compile caches are empty, as a
# fresh cloud machine's or container's are. Three runs of one stage (default coarse, N iterations), each with
# Inductor's and Triton's caches in new empty folders (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR):
#   1 "cold": no file (what a fresh machine costs without one);
#   2 "write": the same, with --set models.compile_cache=FILE, which the stage writes after it;
#   3 "read": FILE read before the stage (the file carried to a fresh machine).
# Each run's speed.json comes back as $OUT/ccache_{cold,write,read}.json; their seconds above the steady
# pace print (the compiling a fresh machine does, or skips).
#   bash reports/speed/paper_run/compile_cache.sh [N] [STAGE]     (~6 min on an H200 at N=600, coarse)
# PRESET/EXTRA/MODELS as abab.sh; on a CPU: PYTHON=.venv/bin/python PRESET=smoke EXTRA=--tiny bash … 3 (checks the
# script; nothing compiles there, so no file is written)
N=${1:-600}; STAGE=${2:-coarse}
D=${D:-/tmp/ccache}; rm -rf $D; mkdir -p $D
export PYTHONUNBUFFERED=1
for run in cold write read; do
  file=""; [ $run != cold ] && file="--set models.compile_cache=$D/compile.bin"
  (export TORCHINDUCTOR_CACHE_DIR=$D/inductor_$run TRITON_CACHE_DIR=$D/triton_$run
   timeout ${LIMIT:-300} ${PYTHON:-python3} -m flows.cli bench speed --preset ${PRESET:-magic123} --models-dir ${MODELS:-/tmp/models} \
     --set $STAGE.iters=$N ${EXTRA:-} $file --stages $STAGE --out $D/$run) > $D/$run.log 2>&1
  echo "run $run rc $?; compile.bin $(stat -c %s $D/compile.bin 2>/dev/null || echo absent) bytes"
  tr '\r' '\n' < $D/$run.log | grep -E "^$STAGE |compile cache" | tail -2
  cp $D/$run/speed.json ${OUT:-$D}/ccache_$run.json 2>/dev/null
done
python3 - "$D" "$STAGE" <<'PY'
import json, sys
d, stage = sys.argv[1], sys.argv[2]
for run in ("cold", "write", "read"):
    try:
        st = json.load(open(f"{d}/{run}/speed.json"))["stages"][stage]
    except (OSError, KeyError, ValueError):
        print(f"{run:6s} no record"); continue
    print(f"{run:6s} wall {st['wall_s']:7.1f} s  above the steady pace {st.get('above_steady_s')} s  steady {st.get('ms_per_iter_steady')} ms")
    print(f"       compiles {st.get('compiles', {})}")  # core.perf.CompileLedger (since session 41)
PY
