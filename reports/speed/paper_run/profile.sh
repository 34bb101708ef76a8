#!/bin/bash
# On the GPU machine, in one call: where a guided coarse and a guided fine iteration's time goes
# with the settings of the paper-length runs (compiled UNets; the backends `auto` picks: the
# Triton grid and the torch rasteriser on a machine without the extensions, so nothing to build).
# `bench speed --profile N` times the loop's scopes with the device synchronised around each and
# writes torch.profiler's table over N guided iterations (profile_coarse.txt, profile_fine.txt);
# the free-running ms per iteration to hold them against is in the paper-length runs' speed.json.
# Everything small comes back in $OUT.
#   bash reports/speed/paper_run/profile.sh [N] [EXTRA lift3d options…]
# Coarse 300 iterations (99 reference-only, the UNets' compile at the 100th) and fine 200: ~6 min
# on an H200 with the full-size random-weight priors written first (/tmp/models).
# PRIORS: options the run gets first (default none: the priors' defaults, compile auto = graphs on a GPU with
# two streams; before session 34 this script set sd/zero123.compile=reduce-overhead, the default then)
# FROM: a `bench speed --out` folder with a finished coarse stage (a paper-length run's: its fine mesh has
# ~1.1M faces where 300 coarse iterations give ~0.3M): only the fine stage runs, on a copy of it, e.g.
#   FROM=/tmp/paper FINE=300 bash reports/speed/paper_run/profile.sh 10 --profile-after 100
# (bench speed refuses a window past the stage's end: 99 reference-only + --profile-after + 6 + N)
N=${1:-10}; shift
D=${D:-/tmp/prof}; mkdir -p $D
export PYTHONUNBUFFERED=1
STAGES=coarse,fine; CI="--set coarse.iters=${COARSE:-300}"
# from FROM: its coarse stage's own count unless COARSE is given (the fine stage continues its prior clock)
if [ -n "${FROM:-}" ]; then rm -rf $D/run && cp -r "$FROM" $D/run && STAGES=fine CI=${COARSE:+--set coarse.iters=$COARSE}; fi
timeout ${LIMIT:-560} python3 -m flows.cli bench speed --preset ${PRESET:-magic123} --models-dir ${MODELS:-/tmp/models} \
  ${PRIORS:-} $CI --set fine.iters=${FINE:-200} "$@" \
  --stages $STAGES --profile $N --out $D/run > $D/profile.log 2>&1
echo "bench rc $?"
cp $D/run/speed.json $D/run/profile_*.txt $OUT/ 2>/dev/null
tr '\r' '\n' < $D/profile.log | grep -v -E '(it/s|s/it)(, [^]]*)?\]$' | tail -40 > $OUT/profile_log_tail.txt
cat $OUT/profile_log_tail.txt | tail -12
for f in $OUT/profile_*.txt; do [ -f "$f" ] && { echo "=== $f"; head -12 "$f"; grep -E "time total" "$f"; }; done
