#!/bin/bash
# On the GPU machine, in one call: one stage under two settings in the order A B A B, on one machine
# and one compile cache (the first run of a pair tends to be the slower, so each setting gets both
# places); each run's speed.json comes back as $OUT/abab_rN_{a,b}.json and the steady figures print.
#   bash reports/speed/paper_run/abab.sh "A options" "B options" [ITERS] [STAGE]
# e.g. abab.sh "--set coarse.samples=torch" "--set coarse.samples=triton" 200 coarse   (~5 min on an H200)
# LIMIT (default 200 s a run) must cover each side's cold compile: the first run of a side compiles unless
# the cache already holds that side's artifacts, and a run cut off by the limit saves none (session 32's
# call 6: `reduce-overhead` against a cache of `graphs` runs, 75 s, both A runs cut off, nothing measured).
# A_DIR, B_DIR: the source tree each side runs from (default: this one), for an A/B of two commits, e.g.
#   git archive 0da2157 | (mkdir -p .diag/old && tar x -C .diag/old)   # here; carry .diag/old to the GPU machine
#   B_DIR=.diag/old bash reports/speed/paper_run/abab.sh "" "" 300 coarse   # A: this tree, B: 0da2157's
# PRIORS: options both sides get first (default none: the priors' defaults, compile auto = graphs on a GPU with
# two streams; before session 34 this script set sd/zero123.compile=reduce-overhead, the default then)
# FROM: a `bench speed --out` folder with a finished coarse stage (a paper-length run's, ~1.1M faces in its fine
# mesh): each run starts on a fresh copy of it, so STAGE fine refines that mesh, e.g.
#   FROM=/tmp/paper B_DIR=.diag/old bash reports/speed/paper_run/abab.sh "" "" 300 fine
A=${1:-}; B=${2:-}; N=${3:-200}; STAGE=${4:-coarse}
D=${D:-/tmp/abab}; mkdir -p $D
export PYTHONUNBUFFERED=1
i=0
for side in a b a b; do
  i=$((i + 1)); opts=$A; dir=${A_DIR:-.}; [ $side = b ] && opts=$B && dir=${B_DIR:-.}
  rm -rf $D/r$i; [ -n "${FROM:-}" ] && cp -r "$FROM" $D/r$i
  (cd $dir && timeout ${LIMIT:-200} python3 -m flows.cli bench speed --preset ${PRESET:-magic123} --models-dir ${MODELS:-/tmp/models} \
    ${PRIORS:-} --set $STAGE.iters=$N ${EXTRA:-} \
    --compile-cache $D/cc.bin $opts --stages $STAGE --out $D/r$i) > $D/r$i.log 2>&1
  echo "run $i ($side: $opts) rc $?"
  tr '\r' '\n' < $D/r$i.log | grep -E "^$STAGE " | tail -1
  cp $D/r$i/speed.json ${OUT:-$D}/abab_r${i}_$side.json 2>/dev/null
done
