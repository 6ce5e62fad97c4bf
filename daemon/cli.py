"""The `famulus` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from famulus.daemon.config import ConfigError, config_path, describe, load_config
from famulus.daemon.paths import RuntimeDirError, user_paths
from famulus.ipc.security import SecurityError

logger = logging.getLogger("famulus")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_DAEMON = 0, 1, 2, 3


def _setup_logging(verbose: bool, level: str = "info") -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from famulus.daemon.lifecycle import AlreadyRunning, Daemon

    paths = user_paths()
    config = load_config(paths, args.config)
    _setup_logging(args.verbose, config.daemon.log_level)
    daemon = Daemon(config, paths)
    try:
        daemon.start()
    except AlreadyRunning as exc:
        logger.error("%s", exc)
        return EXIT_ERROR
    except BaseException:
        daemon.shutdown()
        raise
    daemon.run_until_stopped()
    return EXIT_OK


def _client(args: argparse.Namespace) -> Any:
    from famulus.ipc.client import Client

    return Client(timeout_s=args.timeout)


def cmd_status(args: argparse.Namespace) -> int:
    from famulus.ipc.client import DaemonUnavailable

    try:
        with _client(args) as client:
            status = client.call("status")
    except DaemonUnavailable as exc:
        print(f"famulus is not running: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    model = status["model"]
    jobs = status["jobs"]
    print(f"famulus {status['version']}: {status['state']} (pid {status['pid']}, "
          f"up {status['uptime_s']:.0f} s)")
    print(f"model:     {model.get('name') or '-'} {model['state']} on "
          f"{model.get('device') or '-'}" + (f" ({model['error']})" if model.get("error") else ""))
    print(f"queue:     {jobs.get('queued', 0)} queued, {jobs.get('running', 0)} running, "
          f"{jobs.get('done', 0)} done, {jobs.get('failed', 0)} failed")
    print("documents: " + (", ".join(f"{n} {s}" for s, n in sorted(
        status["documents"].items())) or "none"))
    print(f"watching:  {', '.join(status['watch_folders'])}")
    power = status.get("power") or {}
    if power.get("on_battery"):
        deferred = ", folder backlog deferred" if power.get("backlog_deferred") else ""
        print(f"power:     on battery ({power.get('percent')} %{deferred})")
    else:
        print("power:     on AC power")
    video = status.get("video")
    if video is not None:
        workers = ", ".join(f"{w['name']} ({w['state']})" for w in video["workers"])
        print(f"video:     workers: {workers or 'none'}")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    from famulus.ipc.client import DaemonUnavailable

    try:
        with _client(args) as client:
            client.call("shutdown")
    except DaemonUnavailable as exc:
        print(f"famulus is not running: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    print("famulus is stopping")
    return EXIT_OK


def cmd_summarize(args: argparse.Namespace) -> int:
    from famulus.ipc.client import BusError, DaemonUnavailable, Subscriber

    params: dict[str, Any] = ({"text": sys.stdin.read()} if args.path == "-"
                              else {"path": str(Path(args.path).resolve())})
    try:
        with Subscriber(["job.done", "job.failed", "job.progress"]) as sub, \
                _client(args) as client:
            last = client.call("status")["last_seq"]
            reply = client.call("summarize", params)
            job_id = reply["job"]
            if job_id is None:
                print("unchanged since its last summary; nothing to do", file=sys.stderr)
                return EXIT_OK
            print(f"queued as job {job_id}; waiting for the summary", file=sys.stderr)
            model = client.call("status")["model"]
            if model["state"] in ("failed", "missing"):
                print(f"warning: no model is loaded ({model.get('error')}); the job waits in "
                      "the queue until the daemon runs with a working model", file=sys.stderr)
            for event in sub.follow(since=last, client=client,
                                    idle_timeout_s=args.wait_timeout):
                if event.body.get("job") != job_id:
                    continue
                if event.topic == "job.progress":
                    print(f"  step {event.body['step'] + 1} of {event.body['steps']}",
                          file=sys.stderr)
                elif event.topic == "job.failed":
                    print(f"failed: {event.body['error']}", file=sys.stderr)
                    return EXIT_ERROR
                elif event.topic == "job.done":
                    return _print_job_summary(client, job_id)
    except DaemonUnavailable as exc:
        print(f"famulus is not running; start it with `famulus run` ({exc})", file=sys.stderr)
        return EXIT_NO_DAEMON
    except BusError as exc:
        print(f"famulus rejected the request: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    print(f"no result within {args.wait_timeout:.0f} s; the job is still queued, see "
          "`famulus status`", file=sys.stderr)
    return EXIT_ERROR


def _print_job_summary(client: Any, job_id: int) -> int:
    result = client.call("job", {"id": job_id}).get("result") or {}
    if "summary" in result:
        print(result["summary"])
    else:
        print(json.dumps(result))
    return EXIT_OK


def cmd_ask(args: argparse.Namespace) -> int:
    """Send a prompt to the resident model and print the reply as it is generated."""
    from famulus.ipc.client import DaemonUnavailable, Subscriber

    try:
        with Subscriber(["job.token", "job.done", "job.failed", "job.cancelled"]) as sub, \
                _client(args) as client:
            last = client.call("status")["last_seq"]
            job_id = client.call("ask", {"prompt": args.prompt, "stream": True})["job"]
            for event in sub.follow(since=last, client=client, idle_timeout_s=args.wait_timeout):
                if event.body.get("job") != job_id:
                    continue
                if event.topic == "job.token":
                    print(event.body["text"], end="", flush=True)
                elif event.topic == "job.done":
                    print()
                    return EXIT_OK
                else:
                    print(f"\n{event.topic}: {event.body.get('error') or event.body.get('reason')}",
                          file=sys.stderr)
                    return EXIT_ERROR
    except DaemonUnavailable as exc:
        print(f"famulus is not running: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    print(f"\nno reply within {args.wait_timeout:.0f} s", file=sys.stderr)
    return EXIT_ERROR


def cmd_request(args: argparse.Namespace) -> int:
    """Send one simple request (jobs, cancel, search, pause, resume, reload); print the result."""
    from famulus.ipc.client import BusError, DaemonUnavailable

    params: dict[str, Any] = {}
    if args.command == "cancel":
        params = {"id": args.job}
    elif args.command == "search":
        params = {"query": " ".join(args.query)}
    elif args.command == "jobs" and args.state:
        params = {"state": args.state}
    elif args.command in ("pause", "resume") and args.plugin:
        params = {"plugin": args.plugin}
    try:
        with _client(args) as client:
            result = client.call(args.command, params)
    except DaemonUnavailable as exc:
        print(f"famulus is not running: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except BusError as exc:
        print(f"{args.command} failed: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    if args.command == "search":
        for hit in result["results"]:
            print(f"{hit['path'] or '(text)'}: {hit['snippet']}")
    elif args.command == "plugins":
        for plugin in result["plugins"]:
            paused = " (paused)" if plugin["paused"] else ""
            print(f"{plugin['name']:<16} {plugin['state']:<10}{paused} failures="
                  f"{plugin['failures']} {plugin['last_error'] or ''}".rstrip())
    elif args.command == "jobs":
        for job in result["jobs"]:
            print(f"{job['id']:>6} {job['state']:<9} {job['kind']:<20} {job['lane']:<11} "
                  f"{job['error'] or ''}")
    else:
        print(json.dumps(result))
    return EXIT_OK


def cmd_video(args: argparse.Namespace) -> int:
    """Queue a video job; with --wait, print its progress and then the MP4's path."""
    from famulus.ipc.client import BusError, DaemonUnavailable, Subscriber

    params: dict[str, Any] = {"prompt": args.prompt, "audio": args.audio}
    for name in ("frames", "width", "height", "fps", "steps", "seed"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    topics = ["job.progress", "job.done", "job.failed", "job.cancelled", "job.queued"]
    try:
        with Subscriber(topics) as sub, _client(args) as client:
            last = client.call("status")["last_seq"]
            job_id = client.call("video.submit", params)["job"]
            print(f"queued as job {job_id}", file=sys.stderr)
            if not args.wait:
                return EXIT_OK
            for event in sub.follow(since=last, client=client, idle_timeout_s=args.wait_timeout):
                if event.body.get("job") != job_id:
                    continue
                if event.topic == "job.progress":
                    print(f"  step {event.body['step']} of {event.body['steps']}",
                          file=sys.stderr)
                elif event.topic == "job.queued" and event.body.get("retry"):
                    print(f"  retrying: {event.body['retry']}", file=sys.stderr)
                elif event.topic == "job.done":
                    print(event.body["result"]["path"])
                    return EXIT_OK
                elif event.topic in ("job.failed", "job.cancelled"):
                    print(f"{event.topic}: {event.body.get('error') or event.body.get('reason')}",
                          file=sys.stderr)
                    return EXIT_ERROR
    except DaemonUnavailable as exc:
        print(f"famulus is not running: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except BusError as exc:
        print(f"famulus rejected the request: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    print(f"no event within {args.wait_timeout:.0f} s; see `famulus jobs`", file=sys.stderr)
    return EXIT_ERROR


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a video worker that connects to a daemon (started by it, or on another host)."""
    from famulus.daemon.video.supervisor import worker_endpoint
    from famulus.daemon.video.worker import WorkerOptions, default_name, run_worker
    from famulus.ipc.security import KeyStore

    paths = user_paths()
    video = load_config(paths, args.config).video
    connect = args.connect or worker_endpoint(paths.runtime_dir)
    keys = Path(args.keys) if args.keys else KeyStore.default().folder
    options = WorkerOptions(
        connect=connect, model_dir=args.model_dir or video.model_dir,
        device=args.device or video.device, name=args.name or default_name(),
        idle_timeout_s=args.idle_timeout_s, launch_id=args.launch_id,
        keys_folder=keys if connect.startswith("tcp://") and not args.no_curve else None,
        connect_timeout_s=args.connect_timeout_s)
    code = run_worker(options)
    # Tearing down torch at interpreter exit takes a second or more, and the daemon waits
    # for this process at shutdown. run_worker has terminated the ZeroMQ context, which
    # sends the last messages first (for up to the socket's LINGER time).
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


def cmd_subscribe(args: argparse.Namespace) -> int:
    from famulus.ipc.client import DaemonUnavailable, Subscriber

    try:
        with Subscriber(args.topics) as sub:
            events = (sub.follow(since=args.since) if args.since is not None
                      else iter(lambda: sub.recv(), None))
            for event in events:
                if args.json:
                    print(json.dumps(event.envelope(), ensure_ascii=False), flush=True)
                else:
                    body = json.dumps(event.body, ensure_ascii=False)
                    print(f"[{event.seq}] {event.topic} {body}", flush=True)
    except DaemonUnavailable as exc:
        print(f"famulus is not running: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_model_pull(args: argparse.Namespace) -> int:
    from famulus.daemon.model.registry import PullError, pull

    paths = user_paths()
    try:
        dest = pull(paths.models_dir, args.name, local_file=Path(args.file) if args.file else None,
                    progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except PullError as exc:
        print(f"model pull failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(dest)
    return EXIT_OK


def cmd_model_list(args: argparse.Namespace) -> int:
    """List the registered and configured models: size, kind, devices and state."""
    from famulus.daemon.model import catalog
    from famulus.daemon.model.registry import ModelNotFound
    from famulus.ipc.client import DaemonUnavailable

    paths = user_paths()
    config = load_config(paths, args.config)
    try:
        with _client(args) as client:
            status = client.call("status", timeout_s=2.0)
        running = {m["name"]: m for m in (status["model"], status.get("vision")) if m}
    except DaemonUnavailable:
        running = None
    rows = []
    names = catalog.names(config, paths.models_dir)
    if config.model.vision and config.model.vision not in names:
        names.append(config.model.vision)
    for name in names:
        try:
            spec = catalog.spec(config, paths.models_dir, name)
        except ModelNotFound as exc:
            rows.append({"name": name, "error": str(exc)})
            continue
        row = {"name": name, "kind": spec.kind, "format": spec.format,
               "size_bytes": spec.size_bytes(), "devices": list(spec.devices),
               "path": str(spec.path), "default": name == config.model.name,
               "vision": name == config.model.vision,
               "state": "daemon not running" if running is None else "not loaded",
               "device": None}
        if running is not None and name in running:
            row["state"], row["device"] = running[name]["state"], running[name].get("device")
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no models; run `famulus model pull` or `famulus model import`", file=sys.stderr)
        return EXIT_ERROR
    print(f"{'NAME':32} {'KIND':4} {'SIZE':>9} {'DEVICES':16} STATE")
    for row in rows:
        mark = " "
        if row.get("default"):
            mark = "*"
        elif row.get("vision"):
            mark = "+"
        if "error" in row:
            print(f"{mark}{row['name']:31} unusable: {row['error']}")
            continue
        state = row["state"] + (f" on {row['device']}" if row["device"] else "")
        print(f"{mark}{row['name']:31} {row['kind']:4} {row['size_bytes'] / 2**20:7.1f}Mi "
              f"{','.join(row['devices']):16} {state}")
    print("* the model for documents (model.name), + the model for images (model.vision)")
    return EXIT_OK


def cmd_model_control(args: argparse.Namespace) -> int:
    """Ask the running daemon to load, unload, pin or unpin its model."""
    from famulus.ipc.client import BusError, DaemonUnavailable

    method, params = {"load": ("model.load", {}), "unload": ("model.unload", {}),
                      "pin": ("model.pin", {"pinned": True}),
                      "unpin": ("model.pin", {"pinned": False})}[args.model_command]
    try:
        with _client(args) as client:
            result = client.call(method, params)
    except DaemonUnavailable as exc:
        print(f"famulus is not running: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except BusError as exc:
        print(f"{method} failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(result))
    return EXIT_OK


def cmd_model_import(args: argparse.Namespace) -> int:
    from famulus.daemon.model.importer import ImportFailed, import_model
    from famulus.daemon.model.registry import ModelNotFound

    paths = user_paths()
    try:
        entry = import_model(paths.models_dir, args.src, args.weight_format, name=args.name,
                             kind=args.kind, group_size=args.group_size,
                             progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ImportFailed, ModelNotFound) as exc:
        print(f"model import failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("model import cancelled; nothing was registered", file=sys.stderr)
        return EXIT_ERROR
    print(f"{entry['name']}: {entry['path']}")
    return EXIT_OK


def cmd_model_bench(args: argparse.Namespace) -> int:
    """Measure a model on each requested device; with --write, store the best order."""
    from famulus.daemon.model import bench, catalog
    from famulus.daemon.model.config_write import ConfigWriteError, write_device_order
    from famulus.daemon.model.registry import ModelNotFound

    paths = user_paths()
    config = load_config(paths, args.config)
    try:
        devices = bench.parse_devices(args.devices)
        cfg = catalog.spec(config, paths.models_dir, args.name)
    except (ValueError, ModelNotFound) as exc:
        print(f"model bench: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_ERROR
    report = bench.run_bench(
        cfg.path, devices, runs=args.runs, max_new_tokens=args.max_new_tokens,
        load_params={"npu_max_prompt_len": cfg.npu_max_prompt_len,
                     "npu_min_response_len": cfg.npu_min_response_len,
                     "load_timeout_s": cfg.load_timeout_s},
        progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(report.as_dict(), indent=1) if args.json else bench.format_table(report))
    if not args.write:
        return EXIT_OK
    order = bench.best_order(report)
    target, _named = config_path(paths, args.config)
    try:
        write_device_order(target, args.name, order)
    except ConfigWriteError as exc:
        print(f"model bench: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote devices = {json.dumps(order)} to [models.{args.name}] in {target}",
          file=sys.stderr)
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    """Create CURVE keys or authorize a client key for the TCP endpoints."""
    from famulus.ipc import security

    store = security.KeyStore.default()
    if args.keys_command == "server":
        files = security.create_server_keys(store.folder, force=args.force)
        print(f"server keys written; give {files.public} to each client machine")
    elif args.keys_command == "client":
        files = security.create_client_keys(store.folder, args.name, force=args.force)
        print(f"client keys written; authorize {files.public} on the server with "
              f"`famulus keys authorize {files.public.name} --name {args.name}`")
    elif args.keys_command == "authorize":
        path = security.authorize_client(store.folder, Path(args.file), name=args.name,
                                         force=args.force)
        print(f"authorized {path}; restart the daemon to apply it")
    else:
        for name in sorted(store.authorized_clients()):
            print(name)
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    from famulus.daemon.model import catalog
    from famulus.daemon.model.registry import ModelNotFound

    paths = user_paths()
    path, _named = config_path(paths, args.config)
    config = load_config(paths, args.config)
    where = config.source if config.source != "defaults" else f"defaults; no file at {path}"
    from famulus.daemon.plugin_host import check_plugin_tables

    problems = check_plugin_tables(config)
    for problem in problems:
        print(f"plugin config: {problem}", file=sys.stderr)
    if problems:
        return EXIT_ERROR
    print(f"config OK ({where})")
    for item in describe(config):
        print(f"  {item}")
    try:
        model = catalog.spec(config, paths.models_dir, config.model.name)
    except ModelNotFound as exc:
        print(f"model: not usable: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"model: {model.path}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from famulus.daemon.demo import run_demo

    return run_demo(Path(args.samples), timeout_s=args.wait_timeout)


def cmd_tray(args: argparse.Namespace) -> int:
    from famulus.daemon.tray.app import run_tray

    return run_tray(config=args.config, backend=args.backend)


def cmd_service(args: argparse.Namespace) -> int:
    """Install, remove or report the per-user service files."""
    from famulus.service import install as service

    try:
        if args.service_command == "install":
            config = load_config(user_paths(), args.config)
            files = service.install(args.platform, config=args.config,
                                    shutdown_timeout_s=config.daemon.shutdown_timeout_s,
                                    enable=args.enable, force=args.force)
            for item in files:
                print(f"wrote {item.path}")
            if not args.enable:
                print("nothing is enabled yet; to start famulus with your session, run:")
                if (args.platform or service.current_platform()) == "linux":
                    print("  systemctl --user daemon-reload")
                for item in files:
                    print(f"  {' '.join(item.enable)}")
        elif args.service_command == "uninstall":
            removed = service.uninstall()
            for path in removed:
                print(f"removed {path}")
            if not removed:
                print("no service files were installed by famulus")
        else:
            report = service.status()
            print(json.dumps(report, indent=2))
            return EXIT_OK if report["installed"] else EXIT_ERROR
    except service.ServiceError as exc:
        print(f"famulus service {args.service_command} failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="famulus", description=(
        "Always-on local AI daemon: summarizes documents dropped into watched folders with a "
        "local model and publishes the results on a ZeroMQ bus."))
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--config", help="config file (default: the user config folder's "
                        "config.toml, or $FAMULUS_CONFIG)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for each reply from the daemon (default 10)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="run the daemon in the foreground").set_defaults(fn=cmd_run)
    p = sub.add_parser("status", help="show the running daemon's state")
    p.add_argument("--json", action="store_true", help="print the raw status reply")
    p.set_defaults(fn=cmd_status)
    sub.add_parser("stop", help="ask the running daemon to shut down").set_defaults(fn=cmd_stop)

    p = sub.add_parser("summarize", help="summarize a file through the running daemon")
    p.add_argument("path", help="file to summarize, or - to read text from stdin")
    p.add_argument("--wait-timeout", type=float, default=600.0,
                   help="seconds to wait for the summary without any event (default 600)")
    p.set_defaults(fn=cmd_summarize)

    p = sub.add_parser("ask", help="send a prompt to the resident model; the reply streams")
    p.add_argument("prompt", help="the prompt")
    p.add_argument("--wait-timeout", type=float, default=600.0,
                   help="seconds to wait without any event (default 600)")
    p.set_defaults(fn=cmd_ask)
    p = sub.add_parser("jobs", help="list recent jobs")
    p.add_argument("--state", choices=["queued", "running", "done", "failed", "cancelled"],
                   help="only jobs in this state")
    p.set_defaults(fn=cmd_request)
    p = sub.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job", type=int, help="job id (see `famulus jobs`)")
    p.set_defaults(fn=cmd_request)
    p = sub.add_parser("search", help="full-text search over summaries")
    p.add_argument("query", nargs="+", help="words that must all occur")
    p.set_defaults(fn=cmd_request)
    p = sub.add_parser("pause", help="pause the watchers (folder, clipboard)")
    p.add_argument("plugin", nargs="?", help="pause only this plugin, such as clipboard")
    p.set_defaults(fn=cmd_request)
    p = sub.add_parser("resume", help="resume the watchers; a folder scan catches up")
    p.add_argument("plugin", nargs="?", help="resume only this plugin")
    p.set_defaults(fn=cmd_request)
    sub.add_parser("plugins", help="list plugins with their state and last error"
                   ).set_defaults(fn=cmd_request)
    sub.add_parser("reload", help="read the config file again and apply it"
                   ).set_defaults(fn=cmd_request)

    p = sub.add_parser("video", help="queue a video job (LTX-Video on a GPU worker)")
    p.add_argument("prompt", help="what the video shows")
    p.add_argument("--frames", type=int, help="number of frames (default 121; LTX needs 8k+1)")
    p.add_argument("--width", type=int, help="width in pixels (default 704; a multiple of 32)")
    p.add_argument("--height", type=int, help="height in pixels (default 480; a multiple of 32)")
    p.add_argument("--fps", type=int, help="frames per second of the MP4 (default 24)")
    p.add_argument("--steps", type=int, help="denoising steps (default 40)")
    p.add_argument("--seed", type=int, help="random seed, for a repeatable video")
    p.add_argument("--audio", action="store_true",
                   help="add a synchronized audio track (needs an LTX-2 model)")
    p.add_argument("--wait", action="store_true",
                   help="wait for the video, show progress and print the MP4's path")
    p.add_argument("--wait-timeout", type=float, default=3600.0,
                   help="with --wait: seconds to wait without any event (default 3600)")
    p.set_defaults(fn=cmd_video)

    p = sub.add_parser("worker", help="run a video worker that connects to a daemon")
    p.add_argument("--connect", help="the daemon's worker endpoint: tcp://HOST:PORT for a "
                   "remote daemon (default: this user's local daemon)")
    p.add_argument("--model-dir", help="diffusers LTX pipeline folder (default: "
                   "video.model_dir of this machine's config)")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="device to run on (default: video.device of this machine's config)")
    p.add_argument("--keys", help="CURVE key folder with server.key and client.key_secret "
                   "(default: this user's famulus key folder)")
    p.add_argument("--no-curve", action="store_true",
                   help="connect to a tcp:// endpoint whose daemon has video.curve = false")
    p.add_argument("--name", help="name shown in `famulus status` (default: HOST-PID)")
    p.add_argument("--idle-timeout-s", type=float,
                   help="exit after this many seconds without a job (default: the daemon's "
                   "video.idle_timeout_s; 0 never exits)")
    p.add_argument("--connect-timeout-s", type=float, default=15.0,
                   help="give up when the daemon does not reply within this time (default 15)")
    p.add_argument("--launch-id", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_worker)

    p = sub.add_parser("subscribe", help="print events as they are published")
    p.add_argument("topics", nargs="*", help="exact topics to show (default: all)")
    p.add_argument("--since", type=int, help="first replay stored events after this sequence "
                   "number (0 = from the start)")
    p.add_argument("--json", action="store_true", help="print whole envelopes as JSON lines")
    p.set_defaults(fn=cmd_subscribe)

    model = sub.add_parser("model", help="manage models").add_subparsers(dest="model_command",
                                                                          required=True)
    p = model.add_parser("pull", help="download, verify and register a model")
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct",
                   help="model to pull (default: smollm2-135m-instruct)")
    p.add_argument("--file", help="register this local file instead of downloading it")
    p.set_defaults(fn=cmd_model_pull)
    p = model.add_parser("list", help="list the registered and configured models")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(fn=cmd_model_list)
    for name, text in (("load", "load the daemon's model now"),
                       ("unload", "unload the daemon's model (the next job loads it again)"),
                       ("pin", "keep the daemon's model loaded whatever its keep-alive"),
                       ("unpin", "let the keep-alive unload the model again")):
        model.add_parser(name, help=text).set_defaults(fn=cmd_model_control)
    p = model.add_parser("import", help="convert a Hugging Face model to OpenVINO IR and "
                         "register it (needs the `export` extra, see docs/models.md)")
    p.add_argument("src", help="local Hugging Face model folder, or a hub id where the "
                   "network allows it")
    p.add_argument("--weight-format", choices=["int4", "int8"], required=True,
                   help="weight compression: int4 (smaller, for the NPU) or int8")
    p.add_argument("--name", help="registry name (default: the source folder's name in "
                   "lower case)")
    p.add_argument("--kind", choices=["llm", "vlm"], help="llm (LLMPipeline) or vlm "
                   "(VLMPipeline); default: from model_type in the source's config.json")
    p.add_argument("--group-size", type=int, help="int4 only: weights per quantization scale, "
                   "or -1 for one scale per output channel (default: the largest power of "
                   "two up to 128 that divides every layer's input size)")
    p.set_defaults(fn=cmd_model_import)
    p = model.add_parser("bench", help="measure load time, time to first token, tokens per "
                         "second and energy per token on each device")
    p.add_argument("name", help="registered model to measure (for example "
                   "smollm2-135m-instruct)")
    p.add_argument("--devices", default="CPU,GPU,NPU",
                   help="devices to measure, separated by commas (default: CPU,GPU,NPU)")
    p.add_argument("--runs", type=int, default=3,
                   help="timed generations per device; the table shows the median (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens generated in each run (default 64)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--write", action="store_true",
                   help="store the best device order as `devices` in the [models.NAME] table "
                   "of the config file")
    p.set_defaults(fn=cmd_model_bench)

    keys = sub.add_parser("keys", help="CURVE keys for the TCP endpoints").add_subparsers(
        dest="keys_command", required=True)
    p = keys.add_parser("server", help="create this daemon's key pair")
    p.add_argument("--force", action="store_true", help="replace existing keys (kept aside)")
    p.set_defaults(fn=cmd_keys)
    p = keys.add_parser("client", help="create this machine's client key pair")
    p.add_argument("--name", required=True, help="name the server will know this client by")
    p.add_argument("--force", action="store_true", help="replace existing keys (kept aside)")
    p.set_defaults(fn=cmd_keys)
    p = keys.add_parser("authorize", help="accept a client's public key file")
    p.add_argument("file", help="the client's client.key file")
    p.add_argument("--name", required=True, help="name for this client")
    p.add_argument("--force", action="store_true", help="replace a key of the same name")
    p.set_defaults(fn=cmd_keys)
    keys.add_parser("list", help="list authorized clients").set_defaults(fn=cmd_keys)

    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True)
    config.add_parser("check", help="validate the config and print the effective values"
                      ).set_defaults(fn=cmd_config_check)

    p = sub.add_parser("demo", help="run a daemon in a temporary home over sample documents "
                       "and print each summary as it arrives on the bus")
    p.add_argument("samples", help="folder of documents to drop into the watched folder")
    p.add_argument("--wait-timeout", type=float, default=900.0,
                   help="seconds allowed for the whole demo (default 900)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("tray", help="show a tray icon with the daemon's state and a menu "
                       "(needs the `tray` extra and a graphical session)")
    p.add_argument("--backend", choices=["appindicator", "gtk", "xorg"],
                   help="pystray backend to use (default: the first that works here)")
    p.set_defaults(fn=cmd_tray)

    service = sub.add_parser("service", help="start famulus with your session").add_subparsers(
        dest="service_command", required=True)
    p = service.add_parser("install", help="write the user service files (enables nothing "
                           "unless --enable)")
    p.add_argument("--platform", choices=["linux", "macos", "windows"],
                   help="write the files of this platform (default: this one)")
    p.add_argument("--enable", action="store_true",
                   help="also enable and start the daemon's service now")
    p.add_argument("--force", action="store_true",
                   help="replace service files that famulus did not write")
    p.set_defaults(fn=cmd_service)
    service.add_parser("uninstall", help="disable and remove everything install wrote"
                       ).set_defaults(fn=cmd_service)
    service.add_parser("status", help="report the installed files and the service state"
                       ).set_defaults(fn=cmd_service)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("run", "worker"):
        _setup_logging(args.verbose, "warning")
    elif args.command == "worker":
        _setup_logging(args.verbose, "info")
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeDirError, SecurityError) as exc:
        print(f"famulus cannot start: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`famulus subscribe | head`); that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
