#!/bin/bash
# On the GPU machine, detached like chain.sh: build tinycudann and nvdiffrast from a carried source
# archive (scripts/install_extensions.sh --src), then chain.sh with them in $D (default /tmp/ext).
# The build's exit code goes to $D/events ("build rc N"), so poll.sh stops on a failed build too.
#   D=/tmp/ext EXTRA="--set coarse.iters=400 --set fine.iters=300" setsid nohup \
#     bash reports/speed/paper_run/ext.sh .fetched/ext_src.tgz > /tmp/ext.out 2>&1 < /dev/null &
#   D=/tmp/ext bash reports/speed/paper_run/poll.sh 560 "fine rc"
export D=${D:-/tmp/ext}; mkdir -p $D
echo "build start $(date +%s)" >> $D/events
PYTHON=python3 bash scripts/install_extensions.sh --src "$1" --wheel-dir $D/wheels > $D/build.log 2>&1
rc=$?; echo "build rc $rc $(date +%s)" >> $D/events; [ $rc = 0 ] || exit $rc
exec bash "$(dirname "$0")/chain.sh"
