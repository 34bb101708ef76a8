#!/bin/bash
# One call on the GPU machine: the paper-length bench asset's textual inversion (3,000 steps at the
# released recipe), resumed from reports/speed/paper_run/ti_checkpoint.pt when present, stopped after
# DEADLINE s; its checkpoint (every 250 steps, a few kB) and speed.json come back in $OUT, with the
# card's clocks, power and throttle reasons every 5 s (gpu_clocks.csv).
#   [SPEED_JSON=FILE] [CKPT=FILE] [EXTRA="--set K=V …"] bash reports/speed/paper_run/ti.sh DEADLINE
# CKPT: the checkpoint to resume (default: ti_checkpoint.pt here, session 13's, overlap=false); EXTRA:
# settings after the ones below. A checkpoint of other settings is not resumed (its digest differs).
T0=$(date +%s); DEADLINE=${1:-430}; D=${D:-/tmp/s12}; R=$D/run; HERE=$(dirname "$0")
mkdir -p $R/textual_inversion
CKPT=${CKPT:-$HERE/ti_checkpoint.pt}
[ -f $CKPT ] && cp $CKPT $R/textual_inversion/checkpoint.pt
# on a machine without the coarse and fine stages' DIR: SPEED_JSON=their speed.json keeps their records
[ -f $R/speed.json ] || { [ -n "${SPEED_JSON:-}" ] && cp "$SPEED_JSON" $R/speed.json; }
export PYTHONUNBUFFERED=1
python3 -m flows.cli bench speed --preset magic123 --models-dir /tmp/models --set sd.compile=reduce-overhead \
  --set zero123.compile=reduce-overhead --set textual_inversion.checkpoint_every=250 \
  --set textual_inversion.overlap=false ${EXTRA:-} --stages textual_inversion \
  --out $R > $D/textual_inversion.log 2>&1 &
P=$!
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -l 5 > $OUT/gpu_clocks.csv 2>/dev/null & S=$!
while kill -0 $P 2>/dev/null && [ $(( $(date +%s) - T0 )) -lt $DEADLINE ]; do sleep 5; done
kill $P 2>/dev/null; wait $P; rc=$?; kill $S 2>/dev/null; echo "textual inversion: rc $rc after $(( $(date +%s) - T0 )) s"
progress() { tr '\r' '\n' < "$1" | grep -E '(it/s|s/it)(, [^]]*)?\]$'; }
{ tr '\r' '\n' < $D/textual_inversion.log | grep -v '^\s*$' | grep -v -E '(it/s|s/it)(, [^]]*)?\]$' | tail -40
  progress $D/textual_inversion.log | awk 'NR%25==1'; } > $OUT/ti_log.txt
tail -n 20 $OUT/ti_log.txt
cp $R/textual_inversion/checkpoint.pt $OUT/ti_checkpoint.pt 2>/dev/null; cp $R/speed.json $OUT/ 2>/dev/null
python3 -c "import torch; c = torch.load('$R/textual_inversion/checkpoint.pt', weights_only=False); \
print('checkpoint: step', c['step'], 'loop seconds', round(c['elapsed'], 1))"
