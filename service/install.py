"""`famulus service install|uninstall|status`: per-user service files from the templates here.

Install renders the templates for one platform and writes them where that platform's user
service manager looks: systemd user units under `$XDG_CONFIG_HOME/systemd/user`, a launchd
LaunchAgent under `~/Library/LaunchAgents`, and a Task Scheduler XML file under
`%APPDATA%/famulus` for `schtasks /Create /XML`. A manifest lists every file and folder that
install created, so uninstall removes exactly those. Nothing is enabled unless `enable=True`.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any
from xml.sax.saxutils import escape

logger = logging.getLogger(__name__)

PLATFORMS = ("linux", "macos", "windows")
LAUNCHD_LABEL = "famulus.daemon"
MANIFEST_VERSION = 1


class ServiceError(Exception):
    """A service file could not be written, removed or enabled."""


@dataclass(frozen=True)
class ServiceFile:
    """One rendered service file and the command that would enable it."""

    template: str
    path: Path
    text: str
    encoding: str = "utf-8"
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()


@dataclass
class Manifest:
    """Record of an install: files with their SHA-256, folders it created, commands it ran."""

    platforms: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    created_dirs: list[str] = field(default_factory=list)
    enabled: list[list[str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"version": MANIFEST_VERSION, "platforms": self.platforms,
                           "files": self.files, "created_dirs": self.created_dirs,
                           "enabled": self.enabled}, indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ServiceError(f"cannot read the service manifest {path}: {exc}; remove the "
                               "files it lists by hand, then delete it") from exc
        return cls(platforms=list(data.get("platforms", [])), files=dict(data.get("files", {})),
                   created_dirs=list(data.get("created_dirs", [])),
                   enabled=list(data.get("enabled", [])))


def current_platform() -> str:
    if sys.platform == "darwin":
        return "macos"
    if sys.platform == "win32":
        return "windows"
    return "linux"


def home_dir() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def xdg_dir(variable: str, default: str) -> Path:
    # The XDG spec says a relative value is invalid and must be ignored.
    value = os.environ.get(variable, "")
    return Path(value) if os.path.isabs(value) else home_dir() / default


def manifest_path() -> Path:
    """Return where the manifest lives: the famulus data folder (`$XDG_DATA_HOME/famulus`)."""
    return xdg_dir("XDG_DATA_HOME", ".local/share") / "famulus" / "service-manifest.json"


def daemon_command(config: str | None) -> list[str]:
    """Return the argument list that runs the famulus CLI with this interpreter."""
    args = [sys.executable, "-m", "famulus.daemon.cli"]
    if config:
        args += ["--config", str(Path(config).resolve())]
    return args


def systemd_quote(args: Sequence[str]) -> str:
    """Quote arguments for an ExecStart line: `%` and `$` are systemd specifiers there."""
    quoted = []
    for arg in args:
        arg = arg.replace("%", "%%").replace("$", "$$")
        if any(c in arg for c in " \t\"'\\;"):
            arg = '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
        quoted.append(arg)
    return " ".join(quoted)


def windows_quote(args: Sequence[str]) -> str:
    return subprocess.list2cmdline(list(args))


def stop_timeout_s(shutdown_timeout_s: float) -> int:
    """Return the service manager's stop timeout for the daemon's shutdown budget.

    The staged shutdown gives each stage a share of `shutdown_timeout_s`, plus 0.5 s for the
    announcement. Each plugin beyond the first adds a fifth of the budget. Twice the budget
    plus 5 s covers that and a model host that has to be killed.
    """
    return max(15, math.ceil(2 * shutdown_timeout_s + 5))


def _template(name: str) -> Template:
    return Template(resources.files("famulus.service").joinpath(name).read_text(
        encoding="utf-8"))


def render(platform: str, *, config: str | None = None, shutdown_timeout_s: float = 4.0
           ) -> list[ServiceFile]:
    """Render the service files for `platform` ("linux", "macos" or "windows")."""
    command = daemon_command(config)
    stop_s = stop_timeout_s(shutdown_timeout_s)
    home = home_dir()
    if platform == "linux":
        unit_dir = xdg_dir("XDG_CONFIG_HOME", ".config") / "systemd" / "user"
        exec_start = systemd_quote(command)
        files = []
        for name in ("famulus.service", "famulus-tray.service"):
            text = _template(name).substitute(exec_start=exec_start, stop_timeout_s=stop_s)
            files.append(ServiceFile(
                name, unit_dir / name, text,
                enable=("systemctl", "--user", "enable", "--now", name),
                disable=("systemctl", "--user", "disable", "--now", name)))
        return files
    if platform == "macos":
        plist = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        log = home / "Library" / "Logs" / "famulus" / "daemon.log"
        arguments = "\n".join(f"        <string>{escape(arg)}</string>"
                              for arg in [*command, "run"])
        text = _template("famulus.plist").substitute(
            label=LAUNCHD_LABEL, program_arguments=arguments, stop_timeout_s=stop_s,
            log_path=escape(str(log)), plist_path=escape(str(plist)))
        domain = f"gui/{os.getuid()}" if hasattr(os, "getuid") else "gui/UID"
        return [ServiceFile("famulus.plist", plist, text,
                            enable=("launchctl", "bootstrap", domain, str(plist)),
                            disable=("launchctl", "bootout", domain, str(plist)))]
    if platform == "windows":
        appdata = Path(os.environ.get("APPDATA") or home / "AppData" / "Roaming")
        task = appdata / "famulus" / "famulus-task.xml"
        text = _template("famulus-task.xml").substitute(
            command=escape(command[0]), arguments=escape(windows_quote([*command[1:], "run"])),
            user_id=escape(getpass.getuser()), task_path=escape(str(task)))
        return [ServiceFile("famulus-task.xml", task, text, encoding="utf-16",
                            enable=("schtasks", "/Create", "/TN", "famulus", "/XML", str(task)),
                            disable=("schtasks", "/Delete", "/TN", "famulus", "/F"))]
    raise ServiceError(f"unknown platform {platform!r}; use one of {', '.join(PLATFORMS)}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_dirs(folder: Path, created: list[str]) -> None:
    """Create `folder` and its missing parents, recording each one created, outermost first."""
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        missing.append(parent)
    for path in reversed(missing):
        path.mkdir()
        created.append(str(path))


def install(platform: str | None = None, *, config: str | None = None,
            shutdown_timeout_s: float = 4.0, enable: bool = False, force: bool = False
            ) -> list[ServiceFile]:
    """Write the service files and the manifest; return the files written.

    A file that exists and was not written by an earlier install is kept and raises
    ServiceError, unless `force`. With `enable`, the platform's enable commands run as well.
    """
    platform = platform or current_platform()
    files = render(platform, config=config, shutdown_timeout_s=shutdown_timeout_s)
    mpath = manifest_path()
    manifest = Manifest.load(mpath) or Manifest()
    if platform not in manifest.platforms:
        manifest.platforms.append(platform)
    for item in files:
        if item.path.exists() and str(item.path) not in manifest.files and not force:
            raise ServiceError(f"{item.path} exists and was not written by `famulus service "
                               "install`; move it away or pass --force to replace it")
    for item in files:
        _make_dirs(item.path.parent, manifest.created_dirs)
        item.path.write_text(item.text, encoding=item.encoding)
        manifest.files[str(item.path)] = _sha256(item.path)
        logger.info("service file written: path=%s", item.path)
    if enable:
        commands = [item.enable for item in files if item.template != "famulus-tray.service"]
        if platform == "linux":
            commands.insert(0, ("systemctl", "--user", "daemon-reload"))
        for command in commands:
            _run(command)
            manifest.enabled.append(list(command))
    _make_dirs(mpath.parent, manifest.created_dirs)
    mpath.write_text(manifest.to_json(), encoding="utf-8")
    return files


def _run(command: Sequence[str]) -> None:
    try:
        subprocess.run(list(command), check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ServiceError(f"`{command[0]}` was not found; run `{shlex.join(command)}` where "
                           "it is available") from None
    except subprocess.CalledProcessError as exc:
        raise ServiceError(f"`{shlex.join(command)}` failed with code {exc.returncode}: "
                           f"{exc.stderr.strip()}") from None
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`{shlex.join(command)}` did not finish within 60 s") from None


def uninstall() -> list[str]:
    """Disable what install enabled, then remove every file and folder it created.

    Returns the paths removed. A listed file that was edited since is removed too, with a
    warning; a created folder that now contains other files is kept.
    """
    mpath = manifest_path()
    manifest = Manifest.load(mpath)
    if manifest is None:
        return []
    by_enable = {item.enable: item.disable for platform in manifest.platforms
                 for item in render(platform)}
    for command in manifest.enabled:
        disable = by_enable.get(tuple(command))
        if disable is None:
            continue
        try:
            _run(disable)
        except ServiceError as exc:
            logger.warning("could not disable the service: %s", exc)
    removed = []
    for name, digest in manifest.files.items():
        path = Path(name)
        if not path.exists():
            continue
        if _sha256(path) != digest:
            logger.warning("removing %s although it was edited after install", path)
        path.unlink()
        removed.append(name)
    mpath.unlink()
    removed.append(str(mpath))
    for folder in sorted(manifest.created_dirs, key=lambda d: d.count(os.sep), reverse=True):
        try:
            Path(folder).rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            logger.warning("kept folder %s: it contains files that install did not write", folder)
            continue
        removed.append(folder)
    return removed


def status() -> dict[str, Any]:
    """Report the installed files (present, edited or missing) and the service state."""
    manifest = Manifest.load(manifest_path())
    if manifest is None:
        return {"installed": False, "files": {}, "manager": None}
    files = {}
    for name, digest in manifest.files.items():
        path = Path(name)
        if not path.exists():
            files[name] = "missing"
        else:
            files[name] = "ok" if _sha256(path) == digest else "edited"
    return {"installed": True, "platforms": manifest.platforms, "files": files,
            "enabled": [shlex.join(c) for c in manifest.enabled],
            "manager": _manager_state(manifest.platforms)}


def _manager_state(platforms: list[str]) -> dict[str, str] | None:
    """Ask systemd for the units' state; None elsewhere or when no user manager replies."""
    if "linux" not in platforms or current_platform() != "linux":
        return None
    state = {}
    for unit in ("famulus.service", "famulus-tray.service"):
        try:
            out = subprocess.run(["systemctl", "--user", "is-active", unit],
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode not in (0, 3, 4) or not out.stdout.strip():
            return None  # no user manager reachable (code 1 with an error on stderr)
        state[unit] = out.stdout.strip()
    return state
