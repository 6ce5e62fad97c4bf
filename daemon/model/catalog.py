"""The models a daemon can use: `models.json` entries merged with `[models.NAME]` tables.

`famulus model pull` and `famulus model import` register models in `models.json` (path,
format, kind). The config adds or overrides per-model settings in `[models.NAME]` tables;
each key a table leaves out takes the value of the same key in `[model]`. A `ModelSpec` is the
result: everything needed to start a model host for one model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from famulus.daemon.config import Config
from famulus.daemon.model.registry import ModelNotFound, read_registry, resolve
from famulus.daemon.model.validate import detect_kind

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    kind: str
    format: str
    devices: tuple[str, ...]
    max_prompt_tokens: int
    max_new_tokens: int
    repetition_penalty: float
    generation_timeout_s: float
    load_timeout_s: float
    npu_max_prompt_len: int
    npu_min_response_len: int
    keep_alive_s: float
    battery_keep_alive_s: float

    def size_bytes(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def load_params(self, cache_root: Path) -> dict[str, Any]:
        """Build the `load` request for the model host, with this model's compile cache folder."""
        return {"path": str(self.path), "kind": self.kind, "devices": list(self.devices),
                "cache_dir": str(compile_cache_dir(cache_root, self)),
                "npu_max_prompt_len": self.npu_max_prompt_len,
                "npu_min_response_len": self.npu_min_response_len,
                "load_timeout_s": self.load_timeout_s}


def names(config: Config, models_dir: Path) -> list[str]:
    """List every model name in the registry or the config, the configured default first."""
    known = [config.model.name, *read_registry(models_dir), *config.models]
    return list(dict.fromkeys(n for n in known if n))


def spec(config: Config, models_dir: Path, name: str) -> ModelSpec:
    """Resolve one model by name; raises ModelNotFound with the fix when it is unusable."""
    table = dict(config.models.get(name, {}))
    entry = read_registry(models_dir).get(name, {})
    explicit = str(table.get("path", ""))
    if not explicit and name == config.model.name:
        explicit = config.model.path
    if not explicit and not entry and name not in config.models and name != config.model.name:
        raise ModelNotFound(f"no model named {name!r}: it is neither registered in "
                            f"{models_dir} nor configured as [models.{name}]; run `famulus "
                            "model list` to see the known ones")
    path = resolve(models_dir, name, explicit, kind=table.get("kind"))
    fmt = "gguf" if path.is_file() else "openvino"
    kind = str(table.get("kind") or entry.get("kind") or detect_kind(path))
    base = config.model
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ModelSpec):
        if f.name in ("name", "path", "kind", "format"):
            continue
        if f.name in table:
            values[f.name] = table[f.name]
        elif f.name == "devices" and entry.get("devices"):
            # The order `famulus model bench --write` measured, unless the config sets one.
            values[f.name] = tuple(entry["devices"])
        elif f.name == "battery_keep_alive_s":
            values[f.name] = config.power.battery_keep_alive_s
        else:
            values[f.name] = getattr(base, f.name)
    return ModelSpec(name=name, path=path, kind=kind, format=fmt, **values)


def openvino_version() -> str:
    try:
        return version("openvino")
    except PackageNotFoundError:
        return "unknown"


def fingerprint(path: Path) -> str:
    """Return a digest of the model's file names, sizes and modification times.

    Hashing the contents of a multi-GB model at every start would cost seconds of disk reads.
    A real replacement of a model file changes its size or its mtime, so this is enough.
    """
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(path.parent)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                      .encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def compile_cache_dir(cache_root: Path, model: ModelSpec) -> Path:
    """Return the model's compile cache for this OpenVINO version, emptied when stale.

    OpenVINO keys its blobs by model and device, but neither a replaced model nor an upgraded
    OpenVINO removes the old blobs (an NPU blob of a 7B model is gigabytes). So each model has
    one folder holding one subfolder for the running OpenVINO version, and a `model.json` that
    records the fingerprint of the model files the blobs were compiled from.
    """
    root = cache_root / "compiled" / _safe(model.name)
    current = root / openvino_version()
    stamp = root / "model.json"
    want = {"path": str(model.path), "fingerprint": fingerprint(model.path)}
    try:
        have = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        have = None
    if have != want and root.exists():
        logger.info("compile cache of model %s is stale (the model changed); clearing %s",
                    model.name, root)
        shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        for other in root.iterdir():
            if other.is_dir() and other != current:
                logger.info("removing compile cache of OpenVINO %s: %s", other.name, other)
                shutil.rmtree(other, ignore_errors=True)
    current.mkdir(parents=True, exist_ok=True)
    if have != want:
        stamp.write_text(json.dumps(want), encoding="utf-8")
    return current


def _safe(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "model"
