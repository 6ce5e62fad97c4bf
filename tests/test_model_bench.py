"""`famulus model bench`: device measurements, RAPL energy counters, writing the order."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from famulus.daemon.dispatcher import TokenStream
from famulus.daemon.model.bench import (
    FAILED,
    MEASURED,
    NOT_AVAILABLE,
    BenchReport,
    DeviceResult,
    best_order,
    parse_devices,
)
from famulus.daemon.model.config_write import ConfigWriteError, write_device_order
from famulus.daemon.model.rapl import EnergyUnavailable, RaplMeter, energy_joules

MODEL = "smollm2-135m-instruct"


# -- the command on this machine (CPU only) ------------------------------------------------

def test_bench_npu_gpu_cpu_measures_cpu(tmp_path: Path, model_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("# my settings\n[model]\nmax_new_tokens = 100\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "famulus.daemon.cli", "--config", str(config), "model", "bench",
         MODEL, "--devices", "NPU,GPU,CPU", "--runs", "2", "--max-new-tokens", "8", "--json",
         "--write"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = {row["device"]: row for row in report["devices"]}
    assert list(rows) == ["NPU", "GPU", "CPU"]

    for device in ("NPU", "GPU"):
        assert rows[device]["status"] == NOT_AVAILABLE
        assert "OpenVINO found only CPU" in rows[device]["reason"]

    cpu = rows["CPU"]
    assert cpu["status"] == MEASURED, cpu["reason"]
    assert cpu["load_cold_s"] > 0
    assert cpu["tokens_per_s"] > 0
    assert cpu["ttft_ms"] > 0
    assert [run["tokens"] for run in cpu["runs"]] == [8, 8]
    # This machine has no /sys/class/powercap.
    assert cpu["energy_j_per_token"] is None
    assert "not exposed" in cpu["energy_note"]

    assert "loading on CPU" in proc.stderr
    assert "run 2/2 on CPU" in proc.stderr
    written = config.read_text(encoding="utf-8")
    assert written.startswith("# my settings\n[model]\nmax_new_tokens = 100\n")
    assert tomllib.loads(written)["models"][MODEL]["devices"] == ["CPU", "NPU", "GPU"]


def test_bench_table_lists_reasons(tmp_path: Path, model_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "famulus.daemon.cli", "--config", str(config), "model", "bench",
         MODEL, "--devices", "GPU", "--runs", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "GPU     not available" in proc.stdout
    assert "GPU: OpenVINO found only CPU" in proc.stdout


def test_bench_rejects_unknown_device(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "famulus.daemon.cli", "--config", str(config), "model", "bench",
         MODEL, "--devices", "CPU,TPU"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "'CPU,TPU'" in proc.stderr


def test_parse_devices_normalizes() -> None:
    assert parse_devices("npu, cpu,NPU") == ["NPU", "CPU"]
    with pytest.raises(ValueError):
        parse_devices("")


# -- ranking ---------------------------------------------------------------------------------

def _report(*rows: DeviceResult) -> BenchReport:
    return BenchReport(model="m", max_new_tokens=8, runs=1, available=["CPU"],
                       devices=list(rows))


def test_order_fastest_first_without_energy() -> None:
    report = _report(
        DeviceResult("NPU", MEASURED, tokens_per_s=20.0, energy_j_per_token=0.01),
        DeviceResult("GPU", FAILED, reason="RuntimeError: compile"),
        DeviceResult("CPU", MEASURED, tokens_per_s=40.0))
    assert best_order(report) == ["CPU", "NPU", "GPU"]


def test_order_energy_wins_when_all_measured() -> None:
    report = _report(
        DeviceResult("CPU", MEASURED, tokens_per_s=40.0, energy_j_per_token=0.05),
        DeviceResult("GPU", NOT_AVAILABLE, reason="OpenVINO found only CPU, NPU"),
        DeviceResult("NPU", MEASURED, tokens_per_s=20.0, energy_j_per_token=0.01))
    assert best_order(report) == ["NPU", "CPU", "GPU"]


# -- RAPL on a fake sysfs tree ---------------------------------------------------------------

def _zone(root: Path, name: str, energy_uj: int, max_range_uj: int = 262_143_328_850) -> Path:
    zone = root / name
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return zone


def test_rapl_sums_packages_not_subzones(tmp_path: Path) -> None:
    _zone(tmp_path, "intel-rapl:0", 1_000_000)
    _zone(tmp_path, "intel-rapl:1", 5_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 700_000)  # the cores of package 0, already counted
    meter = RaplMeter(tmp_path)
    before = meter.read()
    assert sorted(before) == ["intel-rapl:0", "intel-rapl:1"]

    _zone(tmp_path, "intel-rapl:0", 3_500_000)
    _zone(tmp_path, "intel-rapl:1", 6_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 9_000_000)
    assert meter.joules_since(before) == pytest.approx(3.5)


def test_rapl_corrects_wrap_around(tmp_path: Path) -> None:
    max_range = 262_143_328_850
    _zone(tmp_path, "intel-rapl:0", max_range - 2_000_000, max_range)
    meter = RaplMeter(tmp_path)
    before = meter.read()
    _zone(tmp_path, "intel-rapl:0", 1_000_000, max_range)
    assert meter.joules_since(before) == pytest.approx(3.0)


def test_rapl_zone_change_is_unavailable() -> None:
    with pytest.raises(EnergyUnavailable, match="zones changed"):
        energy_joules({"intel-rapl:0": (1, 10)}, {"intel-rapl:1": (2, 10)})


def test_rapl_absent_tree_not_exposed(tmp_path: Path) -> None:
    with pytest.raises(EnergyUnavailable, match="does not exist"):
        RaplMeter(tmp_path / "powercap").read()
    (tmp_path / "powercap").mkdir()
    with pytest.raises(EnergyUnavailable, match="no intel-rapl:N zone"):
        RaplMeter(tmp_path / "powercap").read()


def test_rapl_unreadable_counter_not_exposed(tmp_path: Path) -> None:
    zone = _zone(tmp_path, "intel-rapl:0", 5)
    (zone / "energy_uj").write_text("n/a\n")
    with pytest.raises(EnergyUnavailable, match="not a number"):
        RaplMeter(tmp_path).read()
    # A counter that cannot be opened as a file. A mode of 000 would not do, because root
    # can still read such a file.
    (zone / "energy_uj").unlink()
    (zone / "energy_uj").mkdir()
    with pytest.raises(EnergyUnavailable, match="cannot read"):
        RaplMeter(tmp_path).read()


# -- --write: editing the TOML text ----------------------------------------------------------

def test_write_adds_table_keeping_comments(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    original = ("# famulus settings\n[model]\n# a comment that must survive\n"
                "max_new_tokens = 100  # trailing comment\n")
    config.write_text(original, encoding="utf-8")
    write_device_order(config, MODEL, ["CPU", "NPU"])
    text = config.read_text(encoding="utf-8")
    assert text.startswith(original)
    assert text.endswith(f"\n[models.{MODEL}]\ndevices = [\"CPU\", \"NPU\"]\n")
    parsed = tomllib.loads(text)
    assert parsed["models"][MODEL]["devices"] == ["CPU", "NPU"]
    assert parsed["model"]["max_new_tokens"] == 100


def test_write_replaces_line_in_table(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f"[models.{MODEL}]  # the default model\n"
        "path = \"/models/a.gguf\"\n"
        "devices = [\n    \"NPU\",  # first try\n    \"CPU\",\n]\n"
        "# keep me\n"
        "[models.other]\ndevices = [\"NPU\"]\n", encoding="utf-8")
    write_device_order(config, MODEL, ["CPU", "NPU"])
    text = config.read_text(encoding="utf-8")
    assert text == (
        f"[models.{MODEL}]  # the default model\n"
        "path = \"/models/a.gguf\"\n"
        "devices = [\"CPU\", \"NPU\"]\n"
        "# keep me\n"
        "[models.other]\ndevices = [\"NPU\"]\n")


def test_write_adds_line_below_header(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[models.\"my.model\"]\npath = \"/m\"\n", encoding="utf-8")
    write_device_order(config, "my.model", ["GPU", "CPU"])
    parsed = tomllib.loads(config.read_text(encoding="utf-8"))
    assert parsed["models"]["my.model"] == {"path": "/m", "devices": ["GPU", "CPU"]}


def test_write_creates_missing_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    write_device_order(config, "my model", ["CPU"])
    assert config.read_text(encoding="utf-8") == "[models.\"my model\"]\ndevices = [\"CPU\"]\n"


def test_write_invalid_result_restores(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    # An inline table cannot be extended by a [models.NAME] header, so the edit is invalid TOML.
    original = f"models = {{ {MODEL} = {{ devices = [\"NPU\"] }} }}\n# end\n".encode()
    config.write_bytes(original)
    config.chmod(0o600)
    with pytest.raises(ConfigWriteError, match="The file is unchanged"):
        write_device_order(config, MODEL, ["CPU"])
    assert config.read_bytes() == original
    assert config.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "config.toml.tmp").exists()


# -- streaming: the first token is not held back ---------------------------------------------

def test_token_stream_sends_first_piece_at_once() -> None:
    sent: list[dict[str, object]] = []
    stream = TokenStream(sent.append)
    stream.add("Hello")
    assert sent == [{"index": 0, "text": "Hello"}]
    stream.add(" world")
    stream.flush()
    assert "".join(str(body["text"]) for body in sent) == "Hello world"
    assert [body["index"] for body in sent] == list(range(len(sent)))
