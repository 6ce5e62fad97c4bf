"""`famulus model import`: convert a Hugging Face model to OpenVINO IR and register it.

The conversion needs optimum-intel, transformers and torch (the `export` extra), which the
daemon core never imports. It runs in a child process, `famulus.daemon.model.export`, in
the interpreter named by FAMULUS_EXPORT_PYTHON or else the current one. This module starts
that child, shows its stages, checks the result with `validate.check_model` and adds it to
models.json.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from famulus.daemon.model.registry import KNOWN_MODELS, read_registry, register
from famulus.daemon.model.validate import KINDS, check_model

logger = logging.getLogger(__name__)

EXPORT_PYTHON_ENV = "FAMULUS_EXPORT_PYTHON"
WEIGHT_FORMATS = ("int4", "int8")
STAGE_PREFIX = "famulus-export:"

# Hugging Face `model_type` values whose export is an image-text-to-text model. All but
# mistral3 are types that VLMPipeline accepts (openvino-genai 2026.4).
VLM_MODEL_TYPES = frozenset({
    "llava", "llava_next", "llava_next_video", "llava-qwen2", "internvl_chat", "minicpmv",
    "phi3_v", "phi4mm", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "gemma3n",
})
# Model types that optimum-intel exports but VLMPipeline rejects (openvino-genai 2026.4).
# With --kind llm the exporter converts their language model alone.
TEXT_ONLY_TYPES = frozenset({"mistral3"})

HEARTBEAT_S = 15.0
INSTALL_HINT = (
    "Install the export extra into a separate virtual environment and point "
    f"{EXPORT_PYTHON_ENV} at it:\n"
    "  python3 -m venv ~/.venvs/famulus-export\n"
    "  ~/.venvs/famulus-export/bin/pip install torch torchvision   "
    "(add --index-url https://download.pytorch.org/whl/cpu for the CPU build; PyPI's "
    "default is the CUDA build, several GB)\n"
    "  ~/.venvs/famulus-export/bin/pip install 'famulus[export]'   "
    "(from a checkout: pip install -e '.[export]')\n"
    f"  export {EXPORT_PYTHON_ENV}=~/.venvs/famulus-export/bin/python\n"
    "torch and torchvision must be a matching pair, which is why they are installed first.")


class ImportFailed(Exception):
    """The import did not produce a registered model; the message explains why and the fix."""


@dataclass(frozen=True)
class Source:
    """The model to import: a local Hugging Face folder (with its config) or a hub id."""

    text: str
    folder: Path | None
    config: dict[str, Any]


def export_python() -> str:
    return os.environ.get(EXPORT_PYTHON_ENV) or sys.executable


def check_export_python(python: str) -> None:
    """Raise ImportFailed unless `python` can import what the export child needs."""
    # find_spec of a submodule imports its parent package and raises when that is missing.
    probe = ("import importlib.util, json\n"
             "def missing(name):\n"
             "    try:\n"
             "        return importlib.util.find_spec(name) is None\n"
             "    except ImportError:\n"
             "        return True\n"
             "names = ['optimum.intel', 'openvino_tokenizers', 'transformers', 'torch',"
             " 'famulus.daemon.model.export']\n"
             "print(json.dumps([n for n in names if missing(n)]))\n")
    try:
        proc = subprocess.run([python, "-c", probe], capture_output=True, text=True,
                              timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImportFailed(f"the export interpreter {python} could not be started: {exc}. "
                           f"{INSTALL_HINT}") from exc
    try:
        missing = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        missing = None
    if proc.returncode != 0 or missing is None:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        raise ImportFailed(f"the export interpreter {python} failed to check its packages "
                           f"(exit code {proc.returncode}: {lines[-1]}). {INSTALL_HINT}")
    if missing:
        raise ImportFailed(f"the export interpreter {python} cannot import "
                           f"{', '.join(missing)}. {INSTALL_HINT}")


def read_source(src: str) -> Source:
    """Return the import source; raise ImportFailed for a folder that is not a model."""
    folder = Path(src).expanduser()
    looks_local = folder.exists() or src.startswith((".", "/", "~")) or src.count("/") != 1
    if not looks_local:
        # A hub id (`owner/name`). The child fetches it when the network allows it.
        return Source(src, None, {})
    if not folder.is_dir():
        raise ImportFailed(f"source folder {folder} does not exist; pass a local Hugging Face "
                           "model folder (it contains config.json) or a hub id such as "
                           "mistralai/Mistral-7B-Instruct-v0.3")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ImportFailed(f"{folder} has no config.json, so it is not a Hugging Face model "
                           "folder; pass the folder that contains config.json and the weights")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ImportFailed(f"{config_file} is unreadable: {exc}") from exc
    if not isinstance(config, dict):
        raise ImportFailed(f"{config_file} is not a JSON object")
    return Source(src, folder.resolve(), config)


def detect_kind(source: Source, requested: str | None = None) -> str:
    """Return the kind to export: `requested`, or "vlm" for a vision-language model type.

    Raises ImportFailed for a type whose vision model VLMPipeline rejects, unless the
    language model alone is requested.
    """
    model_type = str(source.config.get("model_type", ""))
    if model_type in TEXT_ONLY_TYPES and requested != "llm":
        raise ImportFailed(f"{source.text} has model_type {model_type!r}, which VLMPipeline "
                           "rejects (openvino-genai 2026.4). Import its language model alone "
                           "with --kind llm (see docs/models.md)")
    if requested is not None:
        return requested
    return "vlm" if model_type in VLM_MODEL_TYPES else "llm"


def default_name(source: Source) -> str:
    """Derive a registry name from the source folder or hub id: lower-case, no spaces."""
    base = source.folder.name if source.folder is not None else source.text.rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-.") or "imported-model"


def check_name(models_dir: Path, name: str) -> None:
    """Raise ImportFailed when `name` would replace a model that was not imported."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ImportFailed(f"model name {name!r} is invalid; use letters, digits, '.', '_' "
                           "and '-', starting with a letter or digit")
    entry = read_registry(models_dir).get(name)
    if name in KNOWN_MODELS or (entry is not None and entry.get("format") != "openvino"):
        raise ImportFailed(f"model name {name!r} is taken by a model that was not imported; "
                           "choose another one with --name")
    if entry is None and (models_dir / name).exists():
        raise ImportFailed(f"{models_dir / name} exists but is not a registered model; "
                           "remove it or choose another name with --name")


def import_model(models_dir: Path, src: str, weight_format: str, *, name: str | None = None,
                 kind: str | None = None, group_size: int | None = None,
                 python: str | None = None,
                 progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Convert `src`, validate the folder, register it under `name`; return the entry."""
    if weight_format not in WEIGHT_FORMATS:
        raise ImportFailed(f"weight format {weight_format!r} is invalid; use "
                           f"{' or '.join(WEIGHT_FORMATS)}")
    if group_size is not None and (weight_format != "int4"
                                   or not (group_size == -1 or group_size > 0)):
        raise ImportFailed(f"group size {group_size} is invalid; it applies to int4 only and "
                           "is a positive number of weights or -1 (one per output channel)")
    if kind is not None and kind not in KINDS:
        raise ImportFailed(f"kind {kind!r} is invalid; use {' or '.join(KINDS)}")
    source = read_source(src)
    kind = detect_kind(source, kind)
    name = name or default_name(source)
    check_name(models_dir, name)
    python = python or export_python()
    progress(f"checking the export interpreter {python}")
    check_export_python(python)

    dest = models_dir / name
    cmd = [python, "-m", "famulus.daemon.model.export",
           str(source.folder) if source.folder is not None else source.text, str(dest),
           "--weight-format", weight_format, "--kind", kind]
    if group_size is not None:
        cmd += ["--group-size", str(group_size)]
    result = _run_export(cmd, progress)
    check_model(dest, kind)
    entry = {"path": str(dest), "format": "openvino", "kind": kind,
             "weight_format": weight_format, "source": result.get("source", src),
             "openvino_version": result.get("openvino_version"),
             "export_options": result.get("options", [])}
    register(models_dir, name, entry)
    progress(f"registered {name} ({kind}, {weight_format}) at {dest}")
    return {"name": name, **entry}


def _run_export(cmd: list[str], progress: Callable[[str], None]) -> dict[str, Any]:
    """Run the export child, pass its stages to `progress`, return its result object."""
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=30)
    errors: list[str] = []
    last_line = [time.monotonic()]

    def read_stderr(stream: Any) -> None:
        for line in stream:
            line = line.rstrip("\n")
            last_line[0] = time.monotonic()
            if line.startswith(STAGE_PREFIX):
                message = line[len(STAGE_PREFIX):].strip()
                if message.startswith("error:"):
                    errors.append(message[len("error:"):].strip())
                else:
                    progress(f"[{time.monotonic() - started:5.0f} s] {message}")
            elif line.strip():
                tail.append(line)

    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            errors="replace")
    assert proc.stdout is not None and proc.stderr is not None
    reader = threading.Thread(target=read_stderr, args=(proc.stderr,), daemon=True)
    reader.start()
    try:
        output = _wait_with_heartbeat(proc, started, last_line, progress)
    except KeyboardInterrupt:
        # SIGTERM lets the child remove its temporary folder before it exits.
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    reader.join(timeout=10)
    if proc.returncode != 0:
        logger.debug("export child output: %s", "\n".join(tail))
        if errors:
            raise ImportFailed(f"the export failed (exit code {proc.returncode}): {errors[-1]}")
        # No error line: the child died (a signal, or memory), so its own output explains.
        output = "\n".join(tail) or "no output"
        raise ImportFailed(f"the export failed (exit code {proc.returncode}); last output of "
                           f"the exporter:\n{output}")
    try:
        return dict(json.loads(output.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError) as exc:
        raise ImportFailed(f"the exporter exited without a result line ({exc}); last output: "
                           f"{tail[-1] if tail else 'none'}") from exc


def _wait_with_heartbeat(proc: subprocess.Popen[str], started: float, last_line: list[float],
                         progress: Callable[[str], None]) -> str:
    """Wait for the child; report every HEARTBEAT_S of silence so a long step looks alive."""
    assert proc.stdout is not None
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    while True:
        try:
            proc.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now - last_line[0] >= HEARTBEAT_S:
            last_line[0] = now
            progress(f"[{now - started:5.0f} s] still exporting")
    reader.join(timeout=10)
    return "".join(chunks)
