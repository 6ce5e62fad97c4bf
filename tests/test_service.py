"""`famulus service`: rendered units, plist and task XML, and install/uninstall in a temp home."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from famulus.daemon.demo import isolated_env

TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}


def famulus(home: Path, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "famulus.daemon.cli", *args],
                          env=env or isolated_env(home), capture_output=True, text=True,
                          timeout=60)


def file_tree(root: Path) -> dict[str, str]:
    """Map every file and folder below `root` to its kind, for before/after comparisons."""
    tree = {}
    for path in root.rglob("*"):
        tree[str(path.relative_to(root))] = "dir" if path.is_dir() else "file"
    return tree


def test_install_then_uninstall_leaves_nothing(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    before = file_tree(tmp_path)
    for platform in ("linux", "macos", "windows"):
        installed = famulus(tmp_path, "service", "install", "--platform", platform, env=env)
        assert installed.returncode == 0, installed.stderr
        assert "wrote" in installed.stdout
        assert file_tree(tmp_path) != before
        removed = famulus(tmp_path, "service", "uninstall", env=env)
        assert removed.returncode == 0, removed.stderr
        assert file_tree(tmp_path) == before, platform


def test_install_honours_xdg_config_home(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    result = famulus(tmp_path, "service", "install", "--platform", "linux", env=env)
    assert result.returncode == 0, result.stderr
    units = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user"
    assert (units / "famulus.service").is_file()
    assert (units / "famulus-tray.service").is_file()
    assert "systemctl --user enable --now famulus.service" in result.stdout
    # Nothing is enabled: no .wants links were made.
    assert not list(units.glob("*.wants"))


def test_install_keeps_foreign_file(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    units = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user"
    units.mkdir(parents=True)
    (units / "famulus.service").write_text("# mine\n", encoding="utf-8")
    result = famulus(tmp_path, "service", "install", "--platform", "linux", env=env)
    assert result.returncode == 1
    assert "--force" in result.stderr
    assert (units / "famulus.service").read_text(encoding="utf-8") == "# mine\n"


def test_reinstall_then_uninstall_removes_all(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    before = file_tree(tmp_path)
    for _ in range(2):
        result = famulus(tmp_path, "service", "install", "--platform", "linux", env=env)
        assert result.returncode == 0, result.stderr
    status = famulus(tmp_path, "service", "status", env=env)
    assert status.returncode == 0
    assert '"ok"' in status.stdout
    assert famulus(tmp_path, "service", "uninstall", env=env).returncode == 0
    assert file_tree(tmp_path) == before
    assert famulus(tmp_path, "service", "status", env=env).returncode == 1


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing; .ci/setup installs systemd")
        pytest.skip("systemd-analyze is not installed")
    env = isolated_env(tmp_path)
    assert famulus(tmp_path, "service", "install", "--platform", "linux",
                   env=env).returncode == 0
    units = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user"
    text = (units / "famulus.service").read_text(encoding="utf-8")
    assert "Type=notify" in text
    assert "Restart=on-failure" in text
    assert "WatchdogSec=" in text
    assert "TimeoutStopSec=15" in text
    assert f"ExecStart={sys.executable} -m famulus.daemon.cli run" in text
    tray = (units / "famulus-tray.service").read_text(encoding="utf-8")
    assert "After=graphical-session.target" in tray
    assert "PartOf=graphical-session.target" in tray
    result = subprocess.run(
        [analyze, "--user", "verify", str(units / "famulus.service"),
         str(units / "famulus-tray.service")],
        env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # Warnings (an unknown key, a bad value) are printed with code 0, so none may appear.
    assert result.stdout + result.stderr == ""


def test_stop_timeout_follows_config(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text("[daemon]\nshutdown_timeout_s = 20.0\n", encoding="utf-8")
    result = famulus(tmp_path, "--config", str(config), "service", "install", "--platform",
                     "linux", env=env)
    assert result.returncode == 0, result.stderr
    text = (Path(env["XDG_CONFIG_HOME"]) / "systemd/user/famulus.service").read_text(
        encoding="utf-8")
    assert "TimeoutStopSec=45" in text
    assert f"--config {config} run" in text


def test_launchd_plist_keys(tmp_path: Path) -> None:
    assert famulus(tmp_path, "service", "install", "--platform", "macos").returncode == 0
    plist = tmp_path / "Library" / "LaunchAgents" / "famulus.daemon.plist"
    data = plistlib.loads(plist.read_bytes())
    assert data["Label"] == "famulus.daemon"
    assert data["ProgramArguments"] == [sys.executable, "-m", "famulus.daemon.cli", "run"]
    assert data["KeepAlive"] == {"SuccessfulExit": False}
    assert data["ThrottleInterval"] == 10
    assert data["RunAtLoad"] is True
    assert data["ExitTimeOut"] == 15
    assert data["StandardErrorPath"].startswith(str(tmp_path))


def test_windows_task_xml(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    env["APPDATA"] = str(tmp_path / "AppData" / "Roaming")
    assert famulus(tmp_path, "service", "install", "--platform", "windows",
                   env=env).returncode == 0
    task = tmp_path / "AppData" / "Roaming" / "famulus" / "famulus-task.xml"
    assert task.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")  # UTF-16 with a BOM
    root = ET.parse(task).getroot()
    assert root.tag == f"{{{TASK_NS['t']}}}Task"
    trigger = root.find("t:Triggers/t:LogonTrigger", TASK_NS)
    assert trigger is not None
    assert trigger.findtext("t:Enabled", namespaces=TASK_NS) == "true"
    command = root.findtext("t:Actions/t:Exec/t:Command", namespaces=TASK_NS)
    assert command == sys.executable
    arguments = root.findtext("t:Actions/t:Exec/t:Arguments", namespaces=TASK_NS)
    assert arguments == "-m famulus.daemon.cli run"


def test_paths_with_markup_are_escaped(tmp_path: Path) -> None:
    home = tmp_path / "a&b <c>"
    home.mkdir()
    env = isolated_env(home)
    env["APPDATA"] = str(home / "AppData")
    config = home / "config 100%.toml"
    config.write_text("", encoding="utf-8")
    for platform in ("macos", "windows", "linux"):
        result = famulus(home, "--config", str(config), "service", "install", "--platform",
                         platform, env=env)
        assert result.returncode == 0, result.stderr
    plist = plistlib.loads((home / "Library/LaunchAgents/famulus.daemon.plist").read_bytes())
    assert plist["ProgramArguments"][4] == str(config)
    task = ET.parse(home / "AppData/famulus/famulus-task.xml").getroot()
    arguments = task.findtext("t:Actions/t:Exec/t:Arguments", namespaces=TASK_NS)
    assert arguments is not None and str(config) in arguments
    unit = (Path(env["XDG_CONFIG_HOME"]) / "systemd/user/famulus.service").read_text(
        encoding="utf-8")
    assert '"' + str(config).replace("%", "%%") + '"' in unit
