#!/bin/bash
# Pack tiny-cuda-nn (with the parts of its submodules that its PyTorch build reads: cutlass's headers,
# fmt's headers and sources) and nvdiffrast, at the commits scripts/install_extensions.sh pins, into
# one archive for `install_extensions.sh --src FILE.tgz` on a GPU machine without network (~2 MB).
#   bash reports/speed/paper_run/ext_src.sh OUT.tgz [GITDIR]
# GITDIR holds git clones (bare or not) named tiny-cuda-nn, cutlass, fmt and nvdiffrast; without it
# they are cloned from GitHub into a temporary folder.
set -euo pipefail
out=$(realpath -m "${1:?usage: ext_src.sh OUT.tgz [GITDIR]}"); src=${2:-}
pin() { sed -n "s/^$1=//p" "$(dirname "$0")/../../../scripts/install_extensions.sh"; }
TCNN=$(pin TCNN_COMMIT); NVDR=$(pin NVDR_COMMIT)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
if [ -z "$src" ]; then
  src=$work/git
  for r in NVlabs/tiny-cuda-nn NVIDIA/cutlass fmtlib/fmt NVlabs/nvdiffrast; do
    git clone -q --bare "https://github.com/$r" "$src/${r#*/}"; done
fi
sub() { git -C "$src/tiny-cuda-nn" ls-tree "$TCNN" "dependencies/$1" | awk '{print $3}'; }  # a submodule's commit
t=$work/src/tiny-cuda-nn; mkdir -p $t/dependencies/cutlass $t/dependencies/fmt $work/src/nvdiffrast
# data/ (images for the README) is left out; its large files need not be present in GITDIR
git -C "$src/tiny-cuda-nn" archive "$TCNN" bindings include src dependencies CMakeLists.txt LICENSE.txt | tar x -C $t
git -C "$src/cutlass" archive "$(sub cutlass)" include tools/util/include | tar x -C $t/dependencies/cutlass
git -C "$src/fmt" archive "$(sub fmt)" include src | tar x -C $t/dependencies/fmt
git -C "$src/nvdiffrast" archive "$NVDR" nvdiffrast csrc setup.py pyproject.toml MANIFEST.in LICENSE.txt README.md | tar x -C $work/src/nvdiffrast
tar czf "$out" -C "$work" src
echo "ext_src: $out ($(du -h "$out" | cut -f1)): tiny-cuda-nn $TCNN, nvdiffrast $NVDR"
