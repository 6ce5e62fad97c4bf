"""The private runtime directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from famulus.daemon.paths import RuntimeDirError, ensure_private_dir


def test_created_with_mode_700(tmp_path: Path) -> None:
    folder = ensure_private_dir(tmp_path / "run" / "famulus")
    assert folder.stat().st_mode & 0o777 == 0o700


def test_group_readable_dir_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "famulus"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o750)
    with pytest.raises(RuntimeDirError, match="chmod 700"):
        ensure_private_dir(folder)


def test_symlink_rejected(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "famulus").symlink_to(target)
    with pytest.raises(RuntimeDirError, match="not a plain directory"):
        ensure_private_dir(tmp_path / "famulus")
