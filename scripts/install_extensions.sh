#!/usr/bin/env bash
# Build lift3d's two optional CUDA extensions from their upstream sources into the Python that runs
# lift3d. lift3d picks each one at run time when it imports (README "Backends"):
#   tinycudann (tiny-cuda-nn's PyTorch bindings): the coarse stage's hash grid;
#   nvdiffrast: the fine stage's rasteriser.
# Without them, lift3d uses the Triton hash grid and a PyTorch rasteriser.
#
#   bash scripts/install_extensions.sh                   # clone upstream (needs network), build both
#   bash scripts/install_extensions.sh --only nvdiffrast # one of them: tinycudann | nvdiffrast
#   bash scripts/install_extensions.sh --src DIR         # offline: DIR/tiny-cuda-nn (with its
#                                                        # submodules' files) and DIR/nvdiffrast
#   bash scripts/install_extensions.sh --src FILE.tgz    # the same, packed (a top folder inside is fine)
#   bash scripts/install_extensions.sh --wheel-dir DIR   # also keep the built wheels in DIR: on other
#       machines of the same GPU, CUDA and PyTorch, `pip install --no-deps DIR/*.whl` (no build)
#
# Needs a CUDA GPU, a CUDA compiler (nvcc) matching PyTorch's CUDA, and PyTorch installed in
# $PYTHON (default: .venv/bin/python, else python3). Builds for this machine's GPU architecture
# (TCNN_CUDA_ARCHITECTURES / TORCH_CUDA_ARCH_LIST override it). tiny-cuda-nn takes ~4 min to build.
# Pinned upstream commits: the ones lift3d was checked with (reports/coarse, reports/fine).
set -euo pipefail
cd "$(dirname "$0")/.."

TCNN_URL=https://github.com/NVlabs/tiny-cuda-nn
TCNN_COMMIT=6ee3546bda615f51abe684ce9edefeb414689135
NVDR_URL=https://github.com/NVlabs/nvdiffrast
NVDR_COMMIT=253ac4fcea7de5f396371124af597e6cc957bfae

src="" only="" wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --src) src="${2:?--src needs a folder or a .tgz}"; shift 2 ;;
    --only) only="${2:?--only needs tinycudann or nvdiffrast}"; shift 2 ;;
    --wheel-dir) wheels="${2:-}"; [ -n "$wheels" ] || { echo "install_extensions: --wheel-dir needs a folder" >&2; exit 2; }; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install_extensions: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$only" in ""|tinycudann|nvdiffrast) ;; *) echo "install_extensions: --only takes tinycudann or nvdiffrast, not '$only'" >&2; exit 2 ;; esac

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
"$PYTHON" - <<'PY' || exit 2
import shutil, sys
import torch
if not torch.cuda.is_available() or torch.version.cuda is None:
    sys.exit("install_extensions: no CUDA device for PyTorch here; the extensions are built for a GPU")
if shutil.which("nvcc") is None:
    sys.exit("install_extensions: no CUDA compiler (nvcc) on PATH")
PY
arch=$("$PYTHON" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
export TCNN_CUDA_ARCHITECTURES=${TCNN_CUDA_ARCHITECTURES:-$arch}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${arch:0:-1}.${arch: -1}}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -n "$src" ] && [ -f "$src" ]; then
  tar xzf "$src" -C "$work"
  src=$(dirname "$(find "$work" -maxdepth 3 -type d \( -name tiny-cuda-nn -o -name nvdiffrast \) | head -1)")
fi
fetch() {  # name url commit → a source folder
  if [ -n "$src" ]; then
    [ -d "$src/$1" ] || { echo "install_extensions: $src/$1 not found" >&2; exit 2; }
    cp -r "$src/$1" "$work/$1.build"
  else
    git clone -q --recursive "$2" "$work/$1.build"
    git -C "$work/$1.build" checkout -q "$3"
    git -C "$work/$1.build" submodule update -q --init --recursive
  fi
  echo "$work/$1.build"
}

build() {  # source folder, name → installed (and its wheel kept in --wheel-dir)
  if [ -z "$wheels" ]; then
    "$PYTHON" -m pip install -q --no-build-isolation "$1"
  else
    mkdir -p "$wheels"
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$wheels" "$1"
    "$PYTHON" -m pip install -q --no-deps --force-reinstall "$(ls -t "$wheels"/"$2"-*.whl | head -1)"
    echo "install_extensions: kept $(ls -t "$wheels"/"$2"-*.whl | head -1)"
  fi
}

if [ "$only" != nvdiffrast ]; then
  d=$(fetch tiny-cuda-nn "$TCNN_URL" "$TCNN_COMMIT")
  # Two patches, both to the build and not to the maths:
  # 1. setup.py imports pkg_resources, gone from recent setuptools: packaging's Version instead.
  # 2. tcnn::bytes_to_string formats a double through std::ostringstream; where the compiler's
  #    libstdc++ differs from the one loaded at run time that call crashes the first Encoding.forward
  #    (SIGSEGV, reports/coarse "tinycudann on the GPU machine"); snprintf does not touch the locale.
  "$PYTHON" - "$d" <<'PY'
import pathlib, sys
root = pathlib.Path(sys.argv[1])
setup = root / "bindings/torch/setup.py"
s = setup.read_text()
setup.write_text(s.replace("from pkg_resources import parse_version", "from packaging.version import Version as parse_version"))
host = root / "include/tiny-cuda-nn/common_host.h"
h = host.read_text()
old = '\tstd::ostringstream oss;\n\toss.precision(3);\n\toss << count << " " << suffixes[i];\n\treturn oss.str();'
new = '\tchar buf[64];\n\tstd::snprintf(buf, sizeof(buf), "%.3g %s", count, suffixes[i].c_str());\n\treturn std::string{buf};'
if old in h:
    host.write_text(h.replace(old, new))
    print("install_extensions: tiny-cuda-nn bytes_to_string formatted with snprintf")
else:
    print("install_extensions: tiny-cuda-nn bytes_to_string not as expected; left as it is")
PY
  echo "install_extensions: building tinycudann for sm_$TCNN_CUDA_ARCHITECTURES (a few minutes)"
  build "$d/bindings/torch" tinycudann
fi
if [ "$only" != tinycudann ]; then
  d=$(fetch nvdiffrast "$NVDR_URL" "$NVDR_COMMIT")
  echo "install_extensions: building nvdiffrast for $TORCH_CUDA_ARCH_LIST"
  build "$d" nvdiffrast
fi

# What lift3d picks now (the same choice its stages make, and the log line they write).
"$PYTHON" - <<'PY'
import torch
from core.representations.hashgrid import choose_backend, tcnn_available
from core.rendering.raster import make_rasterizer, nvdiffrast_available
cuda = torch.device("cuda")
print(f"install_extensions: tinycudann imports: {tcnn_available()}; hash grid 'auto' on cuda: {choose_backend('auto', cuda)}")
print(f"install_extensions: nvdiffrast imports: {nvdiffrast_available()}; rasteriser 'auto' on cuda: "
      f"{make_rasterizer('auto', cuda).backend}")
PY
