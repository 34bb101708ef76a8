"""Loaded by every Python process started with this folder on PYTHONPATH (keys.sh): Inductor's FX-graph
cache-key details (torch._inductor.codecache's DEBUG record "FX graph cache hash details for key …",
one line per part of the key) appended to $LIFT3D_FX_KEYS_DIR/keys_<pid>.txt, blocks separated by '====='.
A diagnostic for the GPU machine, not part of lift3d."""
import logging
import os

_DIR = os.environ.get("LIFT3D_FX_KEYS_DIR")


class _Keys(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        if "hash details" in msg:
            with open(os.path.join(_DIR, f"keys_{os.getpid()}.txt"), "a") as f:
                f.write(msg + "\n=====\n")


if _DIR:
    _lg = logging.getLogger("torch._inductor.codecache")
    _lg.setLevel(logging.DEBUG)
    _lg.addHandler(_Keys())
    _lg.propagate = False  # the DEBUG records go to the file only, not to torch's handlers
