#!/bin/bash
# The paper-length bench asset on the GPU machine, started detached (setsid) so that no stage depends
# on one call's 10-minute limit: coarse, then fine, into one DIR ($D/run). Each stage's exit code
# and epoch seconds go to $D/events; poll.sh waits on them. Run from the repository root.
#   setsid nohup bash reports/speed/paper_run/chain.sh > /tmp/s12/chain.out 2>&1 < /dev/null &
# Env: D (default /tmp/s12), SPEED_JSON (above), STAGES (default "coarse fine"), BEFORE_FINE (a command run
# before the fine stage; the chain stops if it fails), PACK=1 to pack the coarse stage's field
# for a fine stage on another machine (slim.py), PRESET / MODELS / EXTRA (extra lift3d options).
# TOGETHER (default 1 unless BEFORE_FINE or PACK is set): the stages in one process, as the pipeline runs
# an asset (its Prefect tasks share one process; the fine stage reuses the coarse stage's loaded and
# compiled priors); one event "stages … rc N" then (poll.sh … "chain done"). TOGETHER=0: a process a stage
# (sessions 12–22), each loading and warming the priors again.
D=${D:-/tmp/s12}; R=$D/run; mkdir -p $R
# SPEED_JSON=FILE: the other stages' records from earlier runs (the textual inversion's, session 13:
# ../h200_magic123_paper_s13_ti_coarse.json), so that speed.json ends with the whole asset's total
[ -f $R/speed.json ] || { [ -n "${SPEED_JSON:-}" ] && cp "$SPEED_JSON" $R/speed.json; }
export PYTHONUNBUFFERED=1
# PRIORS: options every stage gets first (default none: the priors' defaults, compile auto = graphs on a GPU;
# until session 41 this script forced session 12's sd/zero123.compile=reduce-overhead, as abab.sh did before
# session 34: PRIORS="--set sd.compile=reduce-overhead --set zero123.compile=reduce-overhead" runs those again)
SETS=(${PRIORS:-} ${EXTRA:-} --set textual_inversion.checkpoint_every=250)
run() { python3 -m flows.cli bench speed --preset ${PRESET:-magic123} --models-dir ${MODELS:-/tmp/models} \
          "${SETS[@]}" --compile-cache $D/cc.bin --out $R "$@"; }
ev() { echo "$* $(date +%s)" >> $D/events; }
if [ "${TOGETHER:-$([ -z "${BEFORE_FINE:-}" ] && [ "${PACK:-0}" != 1 ] && echo 1)}" = 1 ]; then
  list=$(echo ${STAGES:-coarse fine} | tr ' ' ,)
  ev "stages $list start"
  run --stages $list > $D/stages.log 2>&1; ev "stages $list rc $?"
  ev "chain done"; exit 0
fi
for stage in ${STAGES:-coarse fine}; do
  # BEFORE_FINE: a command that must succeed before the fine stage (ext.sh: nvdiffrast's build)
  if [ "$stage" = fine ] && [ -n "${BEFORE_FINE:-}" ]; then
    bash -c "$BEFORE_FINE"; rc=$?; ev "before fine rc $rc"; [ $rc = 0 ] || break
  fi
  ev "$stage start"
  run --stages $stage > $D/$stage.log 2>&1; ev "$stage rc $?"
  cp $R/speed.json $D/speed_$stage.json 2>/dev/null
  if [ "$stage" = coarse ] && [ "${PACK:-0}" = 1 ]; then
    python3 "$(dirname "$0")/slim.py" pack $R/coarse $D/pack > $D/slim.log 2>&1; ev "slim rc $?"
  fi
done
ev "chain done"
