"""Cache keys for the pipeline's Prefect tasks: input file contents + parameters + code.

A task's key hashes
  * the contents of every input file or folder it is given (not their paths or mtimes),
  * the parameter sections the step reads (core.params.STEP_READS: a change to `evaluate.*`
    re-runs evaluation only),
  * the source of the task and of every `core` module its entry module imports, transitively
    (so a change to core/representations/dmtet.py re-runs the fine stage and what follows, not segmentation).
"""
from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from prefect.cache_policies import CachePolicy

from core.params import sections_digest

REPO = Path(__file__).resolve().parent.parent


def hash_path(path: Path | str) -> str:
    """sha256 over a file's bytes, or over a folder's relative names and file bytes (sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode())
            h.update(hash_path(p).encode())
    elif path.is_file():
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(b"<missing>")
    return h.hexdigest()


def _module_file(name: str) -> Optional[Path]:
    rel = Path(*name.split("."))
    for cand in (REPO / rel.with_suffix(".py"), REPO / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _core_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "core" or n.startswith("core.")}


def module_files(*entry_modules: str) -> dict[str, Path]:
    """The source files of the entry modules and every core module they import, transitively."""
    seen: dict[str, Path] = {}
    todo = list(entry_modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        f = _module_file(name)
        if f is None:
            continue
        seen[name] = f
        todo.extend(_core_imports(f))
    return seen


@lru_cache(maxsize=None)
def code_digest(*entry_modules: str) -> str:
    """Hash of the source of the entry modules and every core module they import, transitively."""
    seen = module_files(*entry_modules)
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(name.encode())
        h.update(seen[name].read_bytes())
    return h.hexdigest()


class StepCachePolicy(CachePolicy):
    """Prefect cache policy: input files' contents + chosen params sections + code.

    `file_args` name the task arguments that are paths whose *contents* matter (a dotted name
    reaches into the params: 'params.prompt.learned_embeds'); `value_args` are plain values that
    matter as they are; the argument `params` (core.params.Params) contributes `sections`.
    The output folder argument is deliberately not part of the key.
    """

    def __init__(self, modules: tuple[str, ...], sections: tuple[str, ...],
                 file_args: tuple[str, ...] = (), value_args: tuple[str, ...] = ()):
        super().__init__()
        self.modules, self.sections = modules, sections
        self.file_args, self.value_args = file_args, value_args

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> Optional[str]:
        return step_key(inputs, self.modules, self.sections, self.file_args, self.value_args)


def _arg(inputs: dict[str, Any], name: str) -> Any:
    """A task argument, or (dotted, 'params.a.b') a value inside the params argument."""
    if not name.startswith("params."):
        return inputs.get(name)
    node: Any = inputs.get("params")
    for k in name.split(".")[1:]:
        node = getattr(node, k, None) if not isinstance(node, dict) else node.get(k)
    return node


def step_key(inputs: dict[str, Any], modules, sections, file_args=(), value_args=()) -> str:
    h = hashlib.sha256()
    h.update(code_digest(*modules).encode())
    params = inputs.get("params")
    h.update(sections_digest(params if params is not None else {}, tuple(sections)).encode())
    for a in file_args:
        v = _arg(inputs, a)
        h.update(f"{a}=".encode())
        h.update((hash_path(v) if v else "<none>").encode())
    for a in value_args:
        h.update(f"{a}={json.dumps(inputs.get(a), sort_keys=True, default=str)}".encode())
    return h.hexdigest()
