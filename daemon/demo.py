"""`famulus demo`: the main job end to end in a throwaway home.

It starts a real daemon (`famulus run`) whose folders all live in a temporary directory, drops
the sample documents into its watched folder, and prints each summary as it arrives on the
bus. The model is the one registered in the user's real model folder, so run
`famulus model pull` first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from famulus.daemon.model.registry import ModelNotFound, resolve
from famulus.daemon.paths import user_paths
from famulus.ipc.client import Client, DaemonUnavailable, Subscriber
from famulus.ipc.protocol import Topic

OUTCOMES = (Topic.DOCUMENT_SUMMARIZED, Topic.DOCUMENT_FAILED, Topic.DOCUMENT_SKIPPED)


def isolated_env(home: Path) -> dict[str, str]:
    """Return an environment whose XDG folders all lie below `home`."""
    env = dict(os.environ)
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"),
                     ("XDG_CACHE_HOME", "cache"), ("XDG_RUNTIME_DIR", "run")):
        (home / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        env[var] = str(home / sub)
    env["HOME"] = str(home)
    env.pop("FAMULUS_CONFIG", None)
    return env


def write_config(path: Path, inbox: Path, model_path: Path, quiet_period_s: float = 0.5) -> None:
    path.write_text(textwrap.dedent(f"""\
        [watch]
        folders = [{str(inbox)!r}]
        quiet_period_s = {quiet_period_s}

        [model]
        path = {str(model_path)!r}
        devices = ["NPU", "GPU", "CPU"]
        """), encoding="utf-8")


def wait_for_daemon(client: Client, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait until the daemon reports the state `running` (its watchers have started)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {proc.returncode} during start-up")
        try:
            if client.call("status", timeout_s=1.0)["state"] == "running":
                return
        except DaemonUnavailable:
            pass  # the socket does not exist yet
        time.sleep(0.05)
    raise RuntimeError(f"the daemon was not running within {timeout_s:.0f} s")


@dataclass(frozen=True)
class IsolatedDaemon:
    """A running `famulus run` whose folders all lie below `home`."""

    home: Path
    inbox: Path
    proc: subprocess.Popen[bytes]

    @property
    def requests_endpoint(self) -> str:
        return f"ipc://{self.home / 'run' / 'famulus' / 'requests.sock'}"

    @property
    def events_endpoint(self) -> str:
        return f"ipc://{self.home / 'run' / 'famulus' / 'events.sock'}"


@contextmanager
def isolated_daemon(model_path: Path, *, quiet_period_s: float = 0.5, prefix: str = "famulus-",
                    quiet_stderr: bool = False) -> Iterator[IsolatedDaemon]:
    """Start a daemon in a temporary home, wait until it serves requests, stop it on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        home = Path(tmp)
        env = isolated_env(home)
        write_config(home / "config.toml", home / "inbox", model_path,
                     quiet_period_s=quiet_period_s)
        proc = subprocess.Popen([sys.executable, "-m", "famulus.daemon.cli", "--config",
                                 str(home / "config.toml"), "run"], env=env,
                                stderr=subprocess.DEVNULL if quiet_stderr else None)
        daemon = IsolatedDaemon(home=home, inbox=home / "inbox", proc=proc)
        try:
            with Client(daemon.requests_endpoint) as client:
                wait_for_daemon(client, proc, 120)
            yield daemon
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def run_demo(samples: Path, *, timeout_s: float) -> int:
    try:
        model_path = resolve(user_paths().models_dir, "smollm2-135m-instruct", "")
    except ModelNotFound as exc:
        print(f"demo needs the default model: {exc}", file=sys.stderr)
        return 1
    files = sorted(p for p in samples.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        print(f"no sample documents in {samples}", file=sys.stderr)
        return 1
    with isolated_daemon(model_path, prefix="famulus-demo-") as daemon:
        return _drive(daemon, files, timeout_s)


def _drive(daemon: IsolatedDaemon, files: list[Path], timeout_s: float) -> int:
    client = Client(daemon.requests_endpoint)
    inbox = daemon.inbox
    print(f"daemon is up; dropping {len(files)} documents into {inbox}", flush=True)
    names = {f.name for f in files}
    outcomes: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    with Subscriber(list(OUTCOMES), endpoint=daemon.events_endpoint,
                    requests_endpoint=client.endpoint) as sub:
        for f in files:
            shutil.copy2(f, inbox / f.name)
        for event in sub.follow(since=0, client=client, idle_timeout_s=timeout_s):
            name = Path(event.body.get("path", "")).name
            if name not in names or name in outcomes:
                continue
            outcomes[name] = event.topic
            _print_outcome(len(outcomes), len(files), name, event.topic, event.body)
            if len(outcomes) == len(files) or time.monotonic() > deadline:
                break
    client.close()
    missing = names - outcomes.keys()
    if missing:
        print(f"no outcome within {timeout_s:.0f} s for: {', '.join(sorted(missing))}",
              file=sys.stderr)
        return 1
    summarized = sum(1 for t in outcomes.values() if t == Topic.DOCUMENT_SUMMARIZED)
    print(f"done: {summarized} of {len(files)} documents summarized", flush=True)
    return 0 if summarized == len(files) else 1


def _print_outcome(done: int, total: int, name: str, topic: str, body: dict[str, object]) -> None:
    print(f"\n[{done}/{total}] {name}", flush=True)
    if topic == Topic.DOCUMENT_SUMMARIZED:
        print(f"  model {body.get('model')} on {body.get('device')}, {body.get('chunks')} "
              f"chunk(s), {body.get('generation_s')} s of generation", flush=True)
        print(textwrap.indent(textwrap.fill(str(body.get("summary", "")), 96), "  "), flush=True)
    else:
        print(f"  {topic}: {body.get('reason')}", flush=True)
