"""Configuration: one table of every key with its type, default, unit and help text.

The table is the dataclasses below. `config.example.toml` documents the same keys, and a test
keeps the two in step. Values are validated at load time, and an error names the key, the
value and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from famulus.daemon.paths import UserPaths

CONFIG_ENV = "FAMULUS_CONFIG"
DEFAULT_MODEL = "smollm2-135m-instruct"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """The configuration file is missing, unreadable or has an invalid key or value."""


def setting(default: Any, help: str, **rules: Any) -> Any:
    """Declare one config key: its default, help text and rules (`min`, `choices`).

    Plugins use it for the fields of their own config schema.
    """
    return _setting(default, help, **rules)


def _setting(default: Any, help: str, **rules: Any) -> Any:
    # Lists are stored as tuples so that a Config stays immutable and hashable.
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata={"help": help, **rules})


@dataclass(frozen=True)
class DaemonSection:
    log_level: str = _setting("info", "Log level on stderr: debug, info, warning or error.",
                              choices=LOG_LEVELS)
    shutdown_timeout_s: float = _setting(
        4.0, "Time allowed for the staged shutdown after SIGINT or SIGTERM.", min=0.5)
    plugin_max_failures: int = _setting(
        5, "A plugin that fails this many times in a row is disabled until a restart or "
        "reload.", min=1)
    plugin_restart_backoff_s: float = _setting(
        1.0, "First wait before restarting a failed plugin; doubles after each failure in a "
        "row, up to 300 s.", min=0.0)
    desktop_retry_s: float = _setting(
        30.0, "How often plugins that need a desktop session look for one again while "
        "none is reachable.", min=0.1)


@dataclass(frozen=True)
class WatchSection:
    folders: tuple[str, ...] = _setting(
        ["~/famulus-inbox"], "Folders watched for new documents; created when missing.")
    recursive: bool = _setting(True, "Also watch the subfolders of each folder.")
    quiet_period_s: float = _setting(
        2.0, "A file is read only after its size and mtime stayed unchanged this long.",
        min=0.05)
    ignore_patterns: tuple[str, ...] = _setting(
        [], "Extra glob patterns of file names to ignore, added to the built-in list "
        "(hidden files, partial downloads, office lock files, editor swap files).")
    max_file_bytes: int = _setting(
        50 * 1024 * 1024, "Files larger than this are recorded as too large, not read.", min=1)
    poll_interval_s: float = _setting(
        5.0, "Scan interval when the folders are polled because the inotify watch limit is "
        "reached.", min=0.1)


@dataclass(frozen=True)
class ExtractSection:
    timeout_s: float = _setting(
        60.0, "Time limit of taking the text out of one file; a file that takes longer is "
        "recorded as failed with reason `timeout`.", min=1.0)
    max_memory_bytes: int = _setting(
        1024 * 1024 * 1024, "Address-space limit of the extraction child process; a file "
        "that needs more is recorded as failed with reason `memory`.", min=256 * 1024 * 1024)


@dataclass(frozen=True)
class ModelSection:
    name: str = _setting(DEFAULT_MODEL, "Registered model used for summaries "
                         "(`famulus model pull` registers the default one).")
    path: str = _setting("", "GGUF file or OpenVINO IR folder to load instead of `name`.")
    devices: tuple[str, ...] = _setting(
        ["NPU", "GPU", "CPU"], "OpenVINO devices tried in order; the first that loads is used.",
        choices=("NPU", "GPU", "CPU"))
    max_prompt_tokens: int = _setting(
        1536, "Token budget of one prompt, chat template included; longer documents are "
        "split into chunks that fit.", min=256)
    max_new_tokens: int = _setting(200, "Token limit of one generated summary.", min=16)
    repetition_penalty: float = _setting(
        1.1, "Penalty on repeated tokens; small models loop without it.", min=1.0)
    generation_timeout_s: float = _setting(
        120.0, "Wall-clock limit of one generation; it is cancelled after that.", min=1.0)
    load_timeout_s: float = _setting(
        900.0, "Wall-clock limit of loading the model on one device (NPU compiles are slow).",
        min=1.0)
    npu_max_prompt_len: int = _setting(
        1024, "NPU only: static prompt length (MAX_PROMPT_LEN); caps the prompt budget.",
        min=128)
    npu_min_response_len: int = _setting(
        256, "NPU only: static response length (MIN_RESPONSE_LEN).", min=16)
    keep_alive_s: float = _setting(
        0.0, "On mains power, unload the model after this long without a request; 0 keeps "
        "it loaded. On battery power.battery_keep_alive_s applies.", min=0.0)
    vision: str = _setting(
        "", "Registered vision model (kind vlm) that describes images (png, jpg, webp) in the "
        "watched folders; empty: images are recorded as skipped with reason "
        "`no_vision_model`.")
    vision_path: str = _setting(
        "", "OpenVINO IR folder of a vision model to load instead of `vision`.")
    vision_max_side_px: int = _setting(
        896, "Images are scaled down so that their longer side has at most this many pixels "
        "before the vision model sees them.", min=32)
    vision_max_pixels: int = _setting(
        50_000_000, "Images with more pixels than this (width times height) are recorded as "
        "failed with reason `too_large` instead of decoded.", min=1024)


# Keys that a `[models.NAME]` table may set. Each one left out takes the value of the same key
# in [model] (or power.battery_keep_alive_s).
MODEL_TABLE_KEYS = ("path", "kind", "devices", "max_prompt_tokens", "max_new_tokens",
                    "repetition_penalty", "generation_timeout_s", "load_timeout_s",
                    "npu_max_prompt_len", "npu_min_response_len", "keep_alive_s",
                    "battery_keep_alive_s")
MODEL_KINDS = ("llm", "vlm")


@dataclass(frozen=True)
class GroundingSection:
    enabled: bool = _setting(
        True, "Check every summary's numbers, dates, names and quotes against the source.")
    retry: bool = _setting(
        True, "Generate once more with stricter prompts when a claim is not in the source.")
    on_unsupported: str = _setting(
        "extractive", "What to do when claims are still unsupported after the retry: "
        "drop_sentences (remove the sentences that carry them) or extractive (use the "
        "source's most central sentences instead).", choices=("drop_sentences", "extractive"))
    extractive_sentences: int = _setting(
        3, "Sentences in an extractive summary.", min=1)


@dataclass(frozen=True)
class JobsSection:
    max_attempts: int = _setting(
        3, "Attempts of a job whose failure may be temporary (model host crash, timeout).",
        min=1)
    restart_backoff_s: float = _setting(
        1.0, "First wait before restarting a crashed model host; doubles up to 60 s.", min=0.0)
    max_queued_requests: int = _setting(
        32, "Most interactive requests (summarize, ask) waiting at once; one more gets a "
        "`busy` error reply.", min=1)


@dataclass(frozen=True)
class BusSection:
    max_message_bytes: int = _setting(
        1024 * 1024, "Requests larger than this get a `too_large` error reply; frames over "
        "four times this size close the client's connection instead.", min=1024)
    tcp_requests: str = _setting(
        "", "Extra TCP endpoint for requests, such as tcp://127.0.0.1:5555; empty: off. Set "
        "together with tcp_events. A bind beyond loopback needs curve = true.")
    tcp_events: str = _setting(
        "", "Extra TCP endpoint for events, such as tcp://127.0.0.1:5556; empty: off.")
    curve: bool = _setting(
        False, "Encrypt the TCP endpoints with CURVE and accept only the client keys that "
        "`famulus keys authorize` added.")
    event_retention_days: float = _setting(
        30.0, "Events older than this are deleted from the event log, at start and once a "
        "day; 0 keeps every event.", min=0.0)
    events_page_size: int = _setting(
        500, "Most events returned by one `events` request.", min=1)


@dataclass(frozen=True)
class ScheduleSection:
    reconcile_interval_s: float = _setting(
        3600.0, "Interval of the scan that compares watched folders with the store; 0: off.",
        min=0.0)
    purge_interval_s: float = _setting(
        86400.0, "Interval of the retention purge of old events and clipboard results.",
        min=1.0)
    misfire_grace_s: float = _setting(
        3600.0, "A periodic job that is due for longer than this (after a suspend) is "
        "skipped and logged instead of run late.", min=1.0)


@dataclass(frozen=True)
class PowerSection:
    check_interval_s: float = _setting(
        300.0, "Interval of the battery check; 0: check only at start.", min=0.0)
    defer_backlog_on_battery: bool = _setting(
        True, "On battery, leave folder documents queued until the machine is on AC power; "
        "requests and clipboard jobs still run.")
    battery_keep_alive_s: float = _setting(
        300.0, "On battery, how long the model stays loaded after its last job.", min=0.0)


@dataclass(frozen=True)
class VideoSection:
    model_dir: str = _setting(
        "", "Folder of a diffusers LTX-Video pipeline (model_index.json and its components) "
        "that local video workers load; empty: video jobs fail until it is set.")
    device: str = _setting(
        "cuda", "Device of local video workers: cuda, or cpu (very slow; meant for tests).",
        choices=("cuda", "cpu"))
    output_dir: str = _setting(
        "", "Folder for finished videos; empty: famulus/ in the user's videos folder.")
    idle_timeout_s: float = _setting(
        60.0, "A worker with no job for this long exits, which returns its GPU memory.",
        min=0.0)
    start_local_worker: bool = _setting(
        True, "Start a worker on this machine when video jobs wait and no worker is idle.")
    lease: str = _setting(
        "none", "What the model host does while a local worker runs video jobs: none, "
        "unload (unload, then reload after the video jobs) or wait (video jobs wait for the "
        "running model request; model jobs wait until the video jobs end).",
        choices=("none", "unload", "wait"))
    tcp_endpoint: str = _setting(
        "", "Extra TCP endpoint for remote workers, such as tcp://0.0.0.0:5557; empty: off.")
    curve: bool = _setting(
        True, "Encrypt the TCP worker endpoint with CURVE and accept only the client keys "
        "that `famulus keys authorize` added.")
    max_attempts: int = _setting(
        2, "Attempts of a video job whose worker crashed or was lost.", min=1)
    heartbeat_s: float = _setting(
        1.0, "Interval of heartbeats between the daemon and each worker.", min=0.1)
    heartbeat_timeout_s: float = _setting(
        10.0, "A worker silent for this long is lost: its job is queued again.", min=0.5)
    max_frames: int = _setting(257, "Most frames one video job may request.", min=1)
    max_width_px: int = _setting(1280, "Largest width one video job may request.", min=8)
    max_height_px: int = _setting(1280, "Largest height one video job may request.", min=8)
    max_steps: int = _setting(200, "Most denoising steps one video job may request.", min=1)


@dataclass(frozen=True)
class TraySection:
    notify_summaries: bool = _setting(
        False, "`famulus tray` shows a desktop notification when a summary is ready.")


@dataclass(frozen=True)
class Config:
    daemon: DaemonSection = field(default_factory=DaemonSection)
    watch: WatchSection = field(default_factory=WatchSection)
    extract: ExtractSection = field(default_factory=ExtractSection)
    model: ModelSection = field(default_factory=ModelSection)
    grounding: GroundingSection = field(default_factory=GroundingSection)
    jobs: JobsSection = field(default_factory=JobsSection)
    bus: BusSection = field(default_factory=BusSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    power: PowerSection = field(default_factory=PowerSection)
    video: VideoSection = field(default_factory=VideoSection)
    tray: TraySection = field(default_factory=TraySection)
    # The raw `[plugins.NAME]` tables; each plugin validates its own table against its
    # schema when it starts (see `parse_plugin_section`).
    plugins: types.MappingProxyType[str, Any] = field(
        default_factory=lambda: types.MappingProxyType({}), hash=False)
    # The `[models.NAME]` tables, validated: only the keys each table sets.
    models: types.MappingProxyType[str, Any] = field(
        default_factory=lambda: types.MappingProxyType({}), hash=False)
    source: str = field(default="defaults", compare=False)

    def watch_folders(self) -> list[Path]:
        """Return the watched folders as absolute paths, with ~ and variables expanded."""
        return [Path(os.path.expandvars(f)).expanduser().resolve() for f in self.watch.folders]


_CONFIG_HINTS = typing.get_type_hints(Config)
SECTIONS: dict[str, type] = {
    f.name: _CONFIG_HINTS[f.name] for f in dataclasses.fields(Config)
    if f.name not in ("source", "plugins", "models")
}


def settings() -> list[tuple[str, dataclasses.Field[Any], Any]]:
    """List every key as (dotted name, field, Python type), in table order."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rows.append((f"{section}.{f.name}", f, hints[f.name]))
    return rows


def config_path(paths: UserPaths, explicit: str | None = None) -> tuple[Path, bool]:
    """Return the config file to read and whether the user named it (flag or variable)."""
    if explicit:
        return Path(explicit).expanduser(), True
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env).expanduser(), True
    return paths.config_file, False


def load_config(paths: UserPaths, explicit: str | None = None) -> Config:
    """Load and validate the config; with no file at the default place, use the defaults."""
    path, named = config_path(paths, explicit)
    if not path.exists():
        if named:
            raise ConfigError(f"config file {path} not found; create it from "
                              "config.example.toml or drop --config/FAMULUS_CONFIG")
        return Config()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "<memory>") -> Config:
    """Build a Config from parsed TOML, rejecting unknown keys and invalid values."""
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "plugins":
            sections[name] = _parse_plugin_tables(value, source)
            continue
        if name == "models":
            sections[name] = _parse_model_tables(value, source)
            continue
        owners = [key for key, _, _ in settings() if key.endswith(f".{name}")]
        if not isinstance(value, dict) and owners:
            raise ConfigError(f"{source}: `{name}` is outside any section; put it under its "
                              f"section as {' or '.join(owners)}")
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]; known sections: "
                              f"{', '.join(SECTIONS)}, models.NAME, plugins.NAME")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: `{name}` must be a table ([{name}]), not {value!r}")
        sections[name] = _parse_section(name, SECTIONS[name], value, source)
    return Config(**sections, source=source)


def _parse_plugin_tables(value: Any, source: str) -> types.MappingProxyType[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"{source}: [plugins] may only contain one table per plugin, "
                          "such as [plugins.clipboard]; move other keys into such a table")
    return types.MappingProxyType({name: dict(table) for name, table in value.items()})


def _parse_model_tables(value: Any, source: str) -> types.MappingProxyType[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"{source}: [models] may only contain one table per model, such as "
                          "[models.mistral-7b]; move other keys into such a table")
    fields = {f.name: f for f in dataclasses.fields(ModelSection)}
    fields.update({f.name: f for f in dataclasses.fields(PowerSection)})
    hints = {**typing.get_type_hints(ModelSection), **typing.get_type_hints(PowerSection)}
    tables = {}
    for name, table in value.items():
        parsed: dict[str, Any] = {}
        for key, item in table.items():
            if key == "kind":
                if item not in MODEL_KINDS:
                    raise ConfigError(f"{source}: invalid value {item!r} for models.{name}.kind:"
                                      f" use one of {', '.join(MODEL_KINDS)}")
                parsed[key] = item
                continue
            if key not in MODEL_TABLE_KEYS:
                raise ConfigError(f"{source}: unknown key models.{name}.{key}; known keys: "
                                  f"{', '.join(MODEL_TABLE_KEYS)}")
            parsed[key] = _check_value(f"models.{name}.{key}", item, hints[key], fields[key],
                                       source)
        tables[name] = types.MappingProxyType(parsed)
    return types.MappingProxyType(tables)


def parse_plugin_section(config: Config, name: str, schema: type) -> Any:
    """Validate the `[plugins.NAME]` table against a plugin's schema dataclass.

    The schema is a frozen dataclass whose fields use the same help and rule metadata as the
    core sections. Raises ConfigError naming the key, the value and the fix.
    """
    values = config.plugins.get(name, {})
    return _parse_section(f"plugins.{name}", schema, values, config.source)


def _parse_section(name: str, cls: type, values: dict[str, Any], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parsed: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {name}.{key}; known keys in [{name}]: "
                              f"{', '.join(fields)}")
        parsed[key] = _check_value(f"{name}.{key}", value, hints[key], fields[key], source)
    return cls(**parsed)


def _check_value(key: str, value: Any, kind: Any, spec: dataclasses.Field[Any],
                 source: str) -> Any:
    help_text = spec.metadata["help"]
    where = f"{source}: invalid value {value!r} for {key}"
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings ({help_text})")
        items = tuple(value)
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false ({help_text})")
        return value
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number ({help_text})")
        items = (float(value),)
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number ({help_text})")
        items = (value,)
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string ({help_text})")
        items = (value,)
    else:  # pragma: no cover - the table only uses the types above
        raise TypeError(f"unsupported config type {kind!r} for {key}")
    _check_rules(where, items, spec.metadata)
    return items if typing.get_origin(kind) is tuple else items[0]


def _check_rules(where: str, items: tuple[Any, ...], rules: types.MappingProxyType[str, Any]
                 ) -> None:
    for item in items:
        if "choices" in rules and item not in rules["choices"]:
            raise ConfigError(f"{where}: use one of {', '.join(rules['choices'])}")
        if "min" in rules and item < rules["min"]:
            raise ConfigError(f"{where}: must be at least {rules['min']}")


def describe(config: Config) -> list[str]:
    """Render the effective config as `key=value` items, one per key."""
    items = []
    for key, _spec, _kind in settings():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        items.append(f"{key}={list(value) if isinstance(value, tuple) else value!r}")
    return items
