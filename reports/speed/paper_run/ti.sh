#!/bin/bash
# One call on the GPU machine: the paper-length bench asset's textual inversion (3,000 steps at the
# released recipe), resumed from reports/speed/paper_run/ti_checkpoint.pt when present, stopped after
# DEADLINE s; its checkpoint (every 250 steps, a few kB) and speed.json come back in $OUT.
#   [SPEED_JSON=FILE] bash reports/speed/paper_run/ti.sh DEADLINE
T0=$(date +%s); DEADLINE=${1:-430}; D=${D:-/tmp/s12}; R=$D/run; HERE=$(dirname "$0")
mkdir -p $R/textual_inversion
[ -f $HERE/ti_checkpoint.pt ] && cp $HERE/ti_checkpoint.pt $R/textual_inversion/checkpoint.pt
# on a machine without the coarse and fine stages' DIR: SPEED_JSON=their speed.json keeps their records
[ -f $R/speed.json ] || { [ -n "${SPEED_JSON:-}" ] && cp "$SPEED_JSON" $R/speed.json; }
export PYTHONUNBUFFERED=1
python3 -m flows.cli bench speed --preset magic123 --models-dir /tmp/models --set sd.compile=reduce-overhead \
  --set zero123.compile=reduce-overhead --set textual_inversion.checkpoint_every=250 \
  --set textual_inversion.overlap=false --stages textual_inversion \
  --out $R > $D/textual_inversion.log 2>&1 &
P=$!
while kill -0 $P 2>/dev/null && [ $(( $(date +%s) - T0 )) -lt $DEADLINE ]; do sleep 5; done
kill $P 2>/dev/null; wait $P; echo "textual inversion: rc $? after $(( $(date +%s) - T0 )) s"
progress() { tr '\r' '\n' < "$1" | grep -E '(it/s|s/it)(, [^]]*)?\]$'; }
{ tr '\r' '\n' < $D/textual_inversion.log | grep -v '^\s*$' | grep -v -E '(it/s|s/it)(, [^]]*)?\]$' | tail -40
  progress $D/textual_inversion.log | awk 'NR%25==1'; } > $OUT/ti_log.txt
tail -n 20 $OUT/ti_log.txt
cp $R/textual_inversion/checkpoint.pt $OUT/ti_checkpoint.pt 2>/dev/null; cp $R/speed.json $OUT/ 2>/dev/null
python3 -c "import torch; c = torch.load('$R/textual_inversion/checkpoint.pt', weights_only=False); \
print('checkpoint: step', c['step'], 'loop seconds', round(c['elapsed'], 1))"
