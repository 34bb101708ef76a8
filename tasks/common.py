"""What every task shares: the stale-output check."""
from __future__ import annotations

from pathlib import Path


def complete(out_dir: str | Path, marker: str = "result.json") -> bool:
    """A stage folder is complete when its marker file (written last) exists."""
    return (Path(out_dir) / marker).is_file()
