"""The model host's device fallback, load progress, residency (idle unload, pin, battery)
and the compile cache, with the real model host and the real default model.

Devices this machine lacks are simulated at the one seam the issue names: the host's
FAMULUS_TEST_DEVICE_FAULTS variable makes an NPU or GPU look present and crash or hang when
the model is loaded on it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from famulus.daemon.config import parse_config
from famulus.daemon.model import catalog
from famulus.daemon.model.host import DEVICE_FAULTS_ENV
from famulus.daemon.model.registry import ModelNotFound, register
from famulus.daemon.model.supervisor import LoadFailed, ModelHost


class Events:
    """Collects the host's events; `wait` blocks until one matches."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, body: dict[str, Any]) -> None:
        with self._cond:
            self.items.append((topic, body))
            self._cond.notify_all()

    def topics(self) -> list[str]:
        with self._cond:
            return [t for t, _ in self.items]

    def wait(self, topic: str, timeout: float, **fields: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for t, body in self.items:
                if t == topic and all(body.get(k) == v for k, v in fields.items()):
                    return body
            return None
        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no {topic} {fields} within {timeout} s; got "
                                     f"{self.topics()}")
            body = found()
            assert body is not None
            return body


def make_host(model: Path, events: Events, *, devices: list[str] | None = None,
              faults: str = "", load_timeout_s: float = 120.0, **kw: Any) -> ModelHost:
    env = {**os.environ, DEVICE_FAULTS_ENV: faults}
    return ModelHost({"path": str(model), "devices": devices or ["CPU"], "cache_dir": "",
                      "npu_max_prompt_len": 1024, "npu_min_response_len": 128,
                      "load_timeout_s": load_timeout_s},
                     name="smollm2", on_event=events, env=env, **kw)


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def hosts() -> Iterator[list[ModelHost]]:
    started: list[ModelHost] = []
    yield started
    for host in started:
        host.stop()


def ask(host: ModelHost, tokens: int = 8) -> dict[str, Any]:
    return host.generate([{"role": "user", "content": "Say hello."}], max_new_tokens=tokens,
                         repetition_penalty=1.1, timeout_s=60)


def test_crashing_and_hanging_devices_fall_back_to_cpu(model_path: Path, events: Events,
                                                       hosts: list[ModelHost]) -> None:
    host = make_host(model_path, events, devices=["NPU", "GPU", "CPU"],
                     faults="NPU=hang,GPU=crash", load_timeout_s=15.0, progress_s=0.5)
    hosts.append(host)
    host.ensure_loaded()
    assert host.state.device == "CPU"
    errors = host.state.device_errors
    assert "hung while loading" in errors["NPU"], errors
    assert "crashed while loading" in errors["GPU"], errors
    loaded = events.wait("model.loaded", 5)
    assert loaded["device"] == "CPU"
    assert set(loaded["device_errors"]) == {"NPU", "GPU"}
    # The hang lasted load_timeout_s; progress events named the device meanwhile.
    progress = [b for t, b in events.items if t == "model.loading" and "elapsed_s" in b]
    assert progress
    assert progress[0]["device"] == "NPU", events.items
    assert ask(host)["text"]


def test_every_device_failing_reports_all_reasons(model_path: Path, events: Events,
                                                  hosts: list[ModelHost]) -> None:
    host = make_host(model_path, events, devices=["GPU", "NPU"], faults="GPU=crash")
    hosts.append(host)
    with pytest.raises(LoadFailed) as failure:
        host.ensure_loaded()
    assert "GPU: the model host crashed" in str(failure.value)
    assert "NPU: not available" in str(failure.value)
    failed = events.wait("model.failed", 5)
    assert set(failed["device_errors"]) == {"GPU", "NPU"}
    assert host.state.state == "failed"


def test_idle_unload_then_reload_on_next_request(model_path: Path, events: Events,
                                                 hosts: list[ModelHost]) -> None:
    host = make_host(model_path, events, keep_alive_s=1.0)
    hosts.append(host)
    host.ensure_loaded()
    first_pid = host.state.pid
    assert ask(host)["text"]
    unloaded = events.wait("model.unloaded", 15, reason="idle")
    assert unloaded["idle_s"] >= 1.0
    assert unloaded["device"] == "CPU"
    assert host.state.state == "unloaded"
    assert host.state.pid is None
    assert first_pid is not None
    assert not _alive(first_pid)
    # The next request loads the model again, and the reload is reported.
    assert ask(host)["text"]
    assert events.topics().count("model.loaded") == 2
    assert host.state.state == "loaded"
    assert host.state.pid not in (None, first_pid)


def test_pin_blocks_idle_unload(model_path: Path, events: Events,
                                                           hosts: list[ModelHost]) -> None:
    host = make_host(model_path, events, keep_alive_s=0.5)
    hosts.append(host)
    host.pin(True)
    host.ensure_loaded()
    ask(host)
    # Four keep-alives without an unload: the residency thread honours the pin.
    with pytest.raises(AssertionError):
        events.wait("model.unloaded", 2.0)
    assert host.state.state == "loaded"
    host.pin(False)
    events.wait("model.unloaded", 15, reason="idle")


def test_battery_keep_alive_applies_on_battery_only(model_path: Path, events: Events,
                                                    hosts: list[ModelHost]) -> None:
    host = make_host(model_path, events, keep_alive_s=0.0, battery_keep_alive_s=0.5)
    hosts.append(host)
    host.ensure_loaded()
    assert host.keep_alive() is None  # on mains with keep_alive_s 0: stays loaded
    host.set_on_battery(True)
    assert host.keep_alive() == 0.5
    events.wait("model.unloaded", 15, reason="idle")


def test_unload_request_waits_for_the_running_generation(model_path: Path, events: Events,
                                                         hosts: list[ModelHost]) -> None:
    host = make_host(model_path, events)
    hosts.append(host)
    host.ensure_loaded()
    result: dict[str, Any] = {}
    started = threading.Event()

    def generate() -> None:
        result.update(host.generate([{"role": "user", "content": "Tell a long story."}],
                                    max_new_tokens=64, repetition_penalty=1.1, timeout_s=60,
                                    on_token=lambda piece: started.set()))

    worker = threading.Thread(target=generate)
    worker.start()
    assert started.wait(60), "no token within 60 s"
    host.unload_now()
    worker.join(60)
    assert result.get("tokens"), "the generation in flight was cut off by the unload"
    assert events.wait("model.unloaded", 5)["reason"] == "request"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # kill(0) succeeds on a zombie too; its state in /proc shows that it has exited.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- the registry in the config, and the compile cache ------------------------------------


def test_model_table_overrides_model_section(tmp_path: Path, model_path: Path) -> None:
    register(tmp_path, "tiny", {"path": str(model_path), "format": "gguf", "kind": "llm",
                                "devices": ["GPU", "CPU"]})
    config = parse_config({"model": {"name": "tiny", "max_new_tokens": 64},
                           "models": {"tiny": {"keep_alive_s": 600.0, "npu_max_prompt_len": 2048}},
                           "power": {"battery_keep_alive_s": 30.0}})
    spec = catalog.spec(config, tmp_path, "tiny")
    assert spec.path == model_path
    assert spec.format == "gguf"
    assert spec.kind == "llm"
    assert spec.keep_alive_s == 600.0
    assert spec.npu_max_prompt_len == 2048
    assert spec.max_new_tokens == 64  # from [model]
    assert spec.battery_keep_alive_s == 30.0  # from [power]
    assert spec.devices == ("GPU", "CPU")  # the order `model bench --write` stored
    config = parse_config({"models": {"tiny": {"devices": ["CPU"]}}})
    assert catalog.spec(config, tmp_path, "tiny").devices == ("CPU",)


def test_model_table_by_path_and_unknown_names(tmp_path: Path, model_path: Path) -> None:
    config = parse_config({"models": {"local": {"path": str(model_path), "kind": "llm"}}})
    assert catalog.spec(config, tmp_path, "local").path == model_path
    assert "local" in catalog.names(config, tmp_path)
    with pytest.raises(ModelNotFound, match="famulus model list"):
        catalog.spec(config, tmp_path, "nothing")


@pytest.mark.parametrize("table, message", [
    ({"kind": "tts"}, "models.m.kind: use one of llm, vlm"),
    ({"colour": "red"}, "unknown key models.m.colour"),
    ({"keep_alive_s": -1}, "models.m.keep_alive_s: must be at least 0.0"),
    ({"devices": ["TPU"]}, "models.m.devices: use one of NPU, GPU, CPU"),
])
def test_model_table_errors_name_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=message.replace(".", r"\.")):
        parse_config({"models": {"m": table}})


def test_compile_cache_is_per_model_and_openvino_version(tmp_path: Path, model_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 64)
    config = parse_config({"models": {"m": {"path": str(model)}}})
    spec = catalog.spec(config, tmp_path, "m")
    cache_root = tmp_path / "cache"
    first = catalog.compile_cache_dir(cache_root, spec)
    (first / "blob.cache").write_bytes(b"x")
    # Same model, same OpenVINO: the blobs stay.
    assert catalog.compile_cache_dir(cache_root, spec) == first
    assert (first / "blob.cache").exists()
    # A new OpenVINO version gets a fresh folder and the old one is removed.
    monkeypatch.setattr(catalog, "openvino_version", lambda: "9999.0")
    second = catalog.compile_cache_dir(cache_root, spec)
    assert second.name == "9999.0"
    assert not first.exists()
    (second / "blob.cache").write_bytes(b"x")
    # A replaced model file invalidates its blobs.
    model.write_bytes(b"GGUF" + b"\1" * 128)
    third = catalog.compile_cache_dir(cache_root, spec)
    assert third == second
    assert not (third / "blob.cache").exists()


def test_loaded_model_never_used_unloads_after_keep_alive(model_path: Path, events: Events,
                                                          hosts: list[ModelHost]) -> None:
    # Regression: the residency thread slept through the end of the first load, so a model
    # that got no request after it stayed loaded forever.
    host = make_host(model_path, events, keep_alive_s=0.5)
    hosts.append(host)
    host.ensure_loaded()
    events.wait("model.unloaded", 15, reason="idle")
