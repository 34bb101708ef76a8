#!/bin/bash
# On the GPU machine: wait (at most LIMIT s from now) until chain.sh's $D/events has a line with
# STOP at its start (ext.sh's "before fine rc 0" must not stop a wait for "fine rc"), a failed
# stage or "chain done", printing progress each minute; then copy speed.json and the
# logs' ends to $OUT (and the coarse pack's parts with a third argument "pack").
#   bash reports/speed/paper_run/poll.sh LIMIT STOP [pack]
# A call that must find the machine warm again has to follow a call that returned only small files:
# session 12's first call brought back 30 MB and the machine (30 s idle release) was gone.
T0=$(date +%s); LIMIT=$1; STOP=$2; D=${D:-/tmp/s12}; R=$D/run
# a chain started just before writes its events file within a second or two (session 28's first poll
# looked too early and returned at once)
for _ in $(seq 30); do [ -f $D/events ] && break; sleep 1; done
[ -f $D/events ] || { echo "NO CHAIN HERE: $D/events is missing (a fresh machine)"; exit 3; }
progress() { tr '\r' '\n' < "$1" | grep -E '(it/s|s/it)(, [^]]*)?\]$'; }
last() { for f in coarse fine textual_inversion stages; do [ -f $D/$f.log ] && echo "$f: $(progress $D/$f.log | tail -1 | cut -c1-150)"; done; }
n=0
while :; do
  grep -q "^$STOP" $D/events && break
  grep -q "chain done" $D/events && break
  grep -q "rc [1-9]" $D/events && { echo "A STAGE FAILED"; break; }
  [ $(( $(date +%s) - T0 )) -ge $LIMIT ] && { echo "NOT DONE: $STOP"; break; }
  sleep 5; n=$((n+1)); [ $((n % 12)) -eq 0 ] && { echo "--- $(( $(date +%s) - T0 )) s"; last; }
done
cp $R/speed.json $OUT/ 2>/dev/null
{ echo "=== events"; cat $D/events
  for f in build_tinycudann build_nvdiffrast coarse slim fine textual_inversion stages; do [ -f $D/$f.log ] || continue; echo "=== $f"
    tr '\r' '\n' < $D/$f.log | grep -v '^\s*$' | grep -v -E '(it/s|s/it)(, [^]]*)?\]$' | tail -60
    echo "--- $f progress (every 20th report)"; progress $D/$f.log | awk 'NR%20==1' | tail -60; done
} > $OUT/logs.txt
tail -n 30 $OUT/logs.txt
if [ "$3" = pack ] && ls $D/pack.part* >/dev/null 2>&1; then cp $D/pack.part* $OUT/; fi
