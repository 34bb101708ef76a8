#!/bin/bash
# One call on the GPU machine (~8 min on a fresh H200): why the asset's own stages miss the compile caches
# that models.compile_ahead's side process filled (session 42: every graph missed, while a second side
# process hits the first one's entries). A short asset, the textual inversion (TI steps; it waits for the
# side process) and the coarse stage (300 iterations), in one process, with every Python process's
# Inductor cache-key details logged (sitecustomize.py on PYTHONPATH); then the side process's keys (A)
# against the asset process's (B): the parts of the key that differ.
#   bash reports/speed/paper_run/fx_keys/keys.sh            (D, MODELS, TI as below)
HERE=$(cd "$(dirname "$0")" && pwd)
D=${D:-/tmp/fxk}; rm -rf $D; mkdir -p $D/keys
export LIFT3D_FX_KEYS_DIR=$D/keys PYTHONPATH=$HERE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout ${LIMIT:-540} python3 -m flows.cli bench speed --preset magic123 --models-dir ${MODELS:-/tmp/models} \
  --set textual_inversion.steps=${TI:-300} --set coarse.iters=300 --stages textual_inversion,coarse --out $D/run > $D/run.log 2>&1
echo "bench rc $?"; tr '\r' '\n' < $D/run.log | grep -E "compiled|compile ahead|recompiled" | cut -c1-300
side=$(python3 -c "import json; print(json.load(open('$D/run/textual_inversion/compile_ahead.json'))['pid'])" 2>/dev/null)
ls -la $D/keys
asset=$(ls $D/keys | grep -v "keys_$side.txt" | xargs -I{} sh -c 'echo $(grep -c "=====" '$D'/keys/{}) {}' | sort -n | tail -1 | cut -d' ' -f2)
python3 $HERE/compare.py $D/keys/keys_$side.txt $D/keys/$asset
cp $D/keys/keys_$side.txt ${OUT:-$D}/keys_side.txt 2>/dev/null; cp $D/keys/$asset ${OUT:-$D}/keys_asset.txt 2>/dev/null
gzip -f ${OUT:-$D}/keys_side.txt ${OUT:-$D}/keys_asset.txt 2>/dev/null
