"""Per-user folders: config, data, cache, models and the private runtime directory."""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "famulus"


class RuntimeDirError(Exception):
    """The runtime directory exists but is not private to this user."""


@dataclass(frozen=True)
class UserPaths:
    """The folders famulus uses for the current user."""

    config_dir: Path
    data_dir: Path
    cache_dir: Path
    runtime_dir: Path

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def database(self) -> Path:
        return self.data_dir / "famulus.db"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def lock_file(self) -> Path:
        return self.runtime_dir / "famulus.lock"

    @property
    def events_endpoint(self) -> str:
        return f"ipc://{self.runtime_dir / 'events.sock'}"

    @property
    def requests_endpoint(self) -> str:
        return f"ipc://{self.runtime_dir / 'requests.sock'}"


def user_paths() -> UserPaths:
    """Return the platform's per-user folders (XDG variables are honoured on Linux)."""
    return UserPaths(
        config_dir=Path(platformdirs.user_config_dir(APP_NAME)),
        data_dir=Path(platformdirs.user_data_dir(APP_NAME)),
        cache_dir=Path(platformdirs.user_cache_dir(APP_NAME)),
        runtime_dir=_runtime_dir(),
    )


def _runtime_dir() -> Path:
    # $XDG_RUNTIME_DIR is private to the user and cleared at logout. Sessions without one
    # (cron, containers, CI) fall back to a per-UID folder in the temp directory, which
    # ensure_private_dir() then checks for ownership and mode.
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_dir():
        return Path(base) / APP_NAME
    return Path(tempfile.gettempdir()) / f"{APP_NAME}-{os.getuid()}"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` with mode 0700, or check that an existing one is ours and private.

    The sockets inside rely on the folder's permissions for access control, so a folder
    owned by someone else, or one that others can read or enter, is rejected rather than
    used: its sockets may already have been reached by other users.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"runtime directory {path} is not a plain directory; remove it")
    if info.st_uid != os.getuid():
        raise RuntimeDirError(
            f"runtime directory {path} belongs to UID {info.st_uid}, not to you "
            f"(UID {os.getuid()}); remove it or set XDG_RUNTIME_DIR"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise RuntimeDirError(f"runtime directory {path} has mode {mode:o}, so other users "
                              f"can reach it; run `chmod 700 {path}` or remove it")
    return path
