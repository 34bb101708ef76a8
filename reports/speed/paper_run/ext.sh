#!/bin/bash
# On the GPU machine, detached like chain.sh: build tinycudann and nvdiffrast from a carried source
# archive (scripts/install_extensions.sh --src), then chain.sh with them in $D (default /tmp/ext).
# tinycudann (~3.5 min on 16 cores) is built first: the coarse stage needs it. nvdiffrast, needed
# only by the fine stage, builds beside the coarse stage on MAX_JOBS=2 cores (chain.sh's BEFORE_FINE
# waits for it). Each build's exit code goes to $D/events ("build NAME rc N"), so poll.sh stops on
# a failed build too.
#   D=/tmp/ext [EXTRA="--set coarse.iters=400 --set fine.iters=300"] setsid nohup \
#     bash reports/speed/paper_run/ext.sh .fetched/ext_src.tgz > /tmp/ext.out 2>&1 < /dev/null &
#   D=/tmp/ext bash reports/speed/paper_run/poll.sh 560 "fine rc"
export D=${D:-/tmp/ext}; mkdir -p $D; SRC=$(realpath "$1")
ev() { echo "$* $(date +%s)" >> $D/events; }
build() {  # NAME [env…]: one extension, its wheel kept in $D/wheels
  env "${@:2}" PYTHON=python3 bash scripts/install_extensions.sh --only "$1" --src "$SRC" --wheel-dir $D/wheels \
    > $D/build_$1.log 2>&1; local rc=$?; ev "build $1 rc $rc"; return $rc
}
ev "build start"
build tinycudann || exit 1
( build nvdiffrast MAX_JOBS=2; echo $? > $D/nvdiffrast.rc ) &
export BEFORE_FINE="while [ ! -f $D/nvdiffrast.rc ]; do sleep 2; done; exit \$(cat $D/nvdiffrast.rc)"
exec bash "$(dirname "$0")/chain.sh"
