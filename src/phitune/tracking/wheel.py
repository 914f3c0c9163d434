"""A wheel of the phitune that is running, to travel with a logged model.

phitune is not on PyPI, so a model whose requirements say `phitune==0.1.0` could not be
rebuilt by `mlflow models serve` (default environment manager) or `mlflow models
build-docker`. The model carries this wheel instead and its requirements.txt names
it by a path inside the model folder, which is where MLflow runs `pip install -r`.

Built from the imported package folders (so an editable install ships the code it
runs, not a stale copy), with the installed distribution's METADATA (name, version,
Requires-Dist) and entry points. Deterministic: same files -> same bytes (sorted
entries, fixed timestamps). No build backend, no subprocess: ~0.1 s for ~1 MB of code.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import zipfile
from importlib.metadata import distribution
from pathlib import Path

_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: the same bytes whenever it is built
_PACKAGES = ("phitune", "hydra_plugins.phitune_optuna_sweeper")


def _package_files(module: str):
    """(archive name, path) of every file of an importable package, bytecode left out."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return
    root = Path(list(spec.submodule_search_locations)[0])
    prefix = module.replace(".", "/")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in (".pyc", ".pyo"):
            yield f"{prefix}/{rel.as_posix()}", path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def wheel_name() -> str:
    dist = distribution("phitune")
    return f"phitune-{dist.version}-py3-none-any.whl"


def build_wheel(dest_dir: str | Path) -> Path:
    """Write phitune-<version>-py3-none-any.whl into dest_dir and return its path."""
    dist = distribution("phitune")
    info = f"phitune-{dist.version}.dist-info"
    entries: list[tuple[str, bytes]] = [(name, path.read_bytes()) for module in _PACKAGES
                                        for name, path in _package_files(module)]
    entries.append((f"{info}/METADATA", (dist.read_text("METADATA") or "").encode()))
    entries.append((f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: phitune\nRoot-Is-Purelib: true\n"
                                     b"Tag: py3-none-any\n"))
    entry_points = dist.read_text("entry_points.txt")
    if entry_points:
        entries.append((f"{info}/entry_points.txt", entry_points.encode()))
    entries.append((f"{info}/top_level.txt", b"hydra_plugins\nphitune\n"))
    record = "\n".join([_record_line(n, d) for n, d in entries] + [f"{info}/RECORD,,"]) + "\n"
    entries.append((f"{info}/RECORD", record.encode()))
    out = Path(dest_dir) / wheel_name()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            item = zipfile.ZipInfo(name, date_time=_EPOCH)
            item.compress_type = zipfile.ZIP_DEFLATED
            item.external_attr = 0o644 << 16
            zf.writestr(item, data)
    return out
