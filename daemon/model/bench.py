"""`famulus model bench`: measure one model on each OpenVINO device and rank the devices.

Each device gets its own model host process, so a native crash or a hung compile costs only
that device's row. Per device, it measures the load time twice: without a compile cache
(cold), and again with the cache that the first load wrote (warm). Then come time to first
token and tokens per second, the median of N greedy runs of a fixed prompt that each generate
exactly `max_new_tokens` tokens. Energy per token is measured where Intel RAPL is readable
under /sys/class/powercap.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from famulus.daemon.model.rapl import EnergyUnavailable, RaplMeter
from famulus.daemon.model.supervisor import ModelError, ModelHost

logger = logging.getLogger(__name__)

# Small models reply to this request at length, so greedy decoding rarely ends early. The
# host also sets min_new_tokens, so every run generates exactly max_new_tokens tokens.
BENCH_PROMPT = ("Write a detailed, step by step guide to baking bread at home, covering "
                "ingredients, kneading, proofing and baking.")

MEASURED, NOT_AVAILABLE, FAILED = "measured", "not available", "failed"


@dataclass
class DeviceResult:
    """One device's row of the bench table; timings are None where not measured."""

    device: str
    status: str
    reason: str = ""
    load_cold_s: float | None = None
    load_warm_s: float | None = None
    # Why no warm load was measured, when it was not.
    warm_note: str = ""
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    energy_j_per_token: float | None = None
    energy_note: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BenchReport:
    """All rows of one bench run, in the requested device order."""

    model: str
    max_new_tokens: int
    runs: int
    available: list[str]
    devices: list[DeviceResult]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def available_devices() -> list[str]:
    """Return `openvino.Core().available_devices` (for example ["CPU", "GPU.0"])."""
    from famulus.daemon.model.host import disable_openvino_telemetry

    disable_openvino_telemetry()
    import openvino

    return [str(device) for device in openvino.Core().available_devices]


def is_available(device: str, available: list[str]) -> bool:
    # OpenVINO numbers devices of one kind: "GPU.0", "GPU.1".
    return any(d == device or d.startswith(device + ".") for d in available)


def run_bench(model_path: Path, devices: list[str], *, runs: int, max_new_tokens: int,
              load_params: dict[str, Any], progress: Callable[[str], None] = lambda s: None,
              available: list[str] | None = None, meter: RaplMeter | None = None
              ) -> BenchReport:
    """Measure `model_path` on each of `devices` that OpenVINO offers.

    `load_params` contains the host's load settings other than path, devices and cache_dir
    (npu_max_prompt_len, npu_min_response_len, load_timeout_s).
    """
    found = available_devices() if available is None else available
    meter = meter or RaplMeter()
    rows = []
    for device in devices:
        if not is_available(device, found):
            reason = f"OpenVINO found only {', '.join(found) or 'no devices'}"
            progress(f"{device}: not available ({reason})")
            rows.append(DeviceResult(device, NOT_AVAILABLE, reason))
            continue
        rows.append(_bench_device(model_path, device, runs=runs, max_new_tokens=max_new_tokens,
                                  load_params=load_params, progress=progress, meter=meter))
    return BenchReport(model=str(model_path), max_new_tokens=max_new_tokens, runs=runs,
                       available=found, devices=rows)


def _bench_device(model_path: Path, device: str, *, runs: int, max_new_tokens: int,
                  load_params: dict[str, Any], progress: Callable[[str], None],
                  meter: RaplMeter) -> DeviceResult:
    row = DeviceResult(device, MEASURED)
    # A fresh cache folder makes the first load cold even when the daemon's cache is warm.
    with tempfile.TemporaryDirectory(prefix=f"famulus-bench-{device.lower()}-") as cache:
        params = {**load_params, "path": str(model_path), "devices": [device],
                  "cache_dir": cache}
        host = ModelHost(params, backoff_s=0.0)
        try:
            progress(f"loading on {device} (cold, empty compile cache)...")
            row.load_cold_s = host.ensure_loaded().load_s
            if any(Path(cache).iterdir()):
                # A second process reads the compile cache that the first one wrote.
                host.stop()
                host = ModelHost(params, backoff_s=0.0)
                progress(f"loading on {device} (warm, from the compile cache)...")
                row.load_warm_s = host.ensure_loaded().load_s
            else:
                row.warm_note = "the cold load wrote no compile cache"
            _measure_runs(host, row, runs=runs, max_new_tokens=max_new_tokens,
                          progress=progress, meter=meter)
        except ModelError as exc:
            logger.warning("bench failed on device=%s: %s", device, exc)
            row.status, row.reason = FAILED, f"{type(exc).__name__}: {exc}"
        finally:
            host.stop()
    return row


def _measure_runs(host: ModelHost, row: DeviceResult, *, runs: int, max_new_tokens: int,
                  progress: Callable[[str], None], meter: RaplMeter) -> None:
    messages = [{"role": "user", "content": BENCH_PROMPT}]
    request = {"op": "generate", "messages": messages, "max_new_tokens": max_new_tokens,
               "min_new_tokens": max_new_tokens, "repetition_penalty": 1.0,
               "timeout_s": 600.0, "stream": False}
    # One untimed run first: the first generate on a fresh pipeline allocates its buffers.
    progress(f"warm-up run on {row.device}...")
    host.request(request, 630.0)
    energy: list[float] = []
    for index in range(runs):
        progress(f"run {index + 1}/{runs} on {row.device}...")
        try:
            before = meter.read()
        except EnergyUnavailable as exc:
            before, row.energy_note = None, str(exc)
        reply = host.request(request, 630.0)
        run = {"tokens": reply["tokens"], "ttft_ms": reply["ttft_ms"],
               "tokens_per_s": reply["throughput_tokens_per_s"],
               "generation_s": reply["generation_s"]}
        if before is not None:
            try:
                joules = meter.joules_since(before)
            except EnergyUnavailable as exc:
                row.energy_note = str(exc)
            else:
                run["energy_j"] = round(joules, 3)
                energy.append(joules / max(1, int(reply["tokens"])))
        row.runs.append(run)
    row.ttft_ms = round(statistics.median(r["ttft_ms"] for r in row.runs), 2)
    row.tokens_per_s = round(statistics.median(r["tokens_per_s"] for r in row.runs), 2)
    if len(energy) == len(row.runs):
        row.energy_j_per_token = round(statistics.median(energy), 5)
        row.energy_note = ("whole package (RAPL), other processes included"
                           if not row.energy_note else row.energy_note)


def best_order(report: BenchReport) -> list[str]:
    """Rank the devices: fastest first, or least energy per token when all measured have it.

    Devices that failed or are not available follow in their requested order, so the daemon
    still tries them last.
    """
    measured = [r for r in report.devices if r.status == MEASURED]
    others = [r.device for r in report.devices if r.status != MEASURED]
    if measured and all(r.energy_j_per_token is not None for r in measured):
        measured.sort(key=lambda r: r.energy_j_per_token or 0.0)
    else:
        measured.sort(key=lambda r: -(r.tokens_per_s or 0.0))
    return [r.device for r in measured] + others


def format_table(report: BenchReport) -> str:
    """Render the report as a plain-text table with one row per device."""
    header = ("device", "status", "load cold", "load warm", "TTFT", "tokens/s", "energy/token")
    lines = [header]
    notes = []
    for row in report.devices:
        if row.status != MEASURED:
            lines.append((row.device, row.status, "-", "-", "-", "-", "-"))
            notes.append(f"{row.device}: {row.reason}")
            continue
        lines.append((
            row.device, row.status, _seconds(row.load_cold_s),
            _seconds(row.load_warm_s) if row.load_warm_s is not None else "-",
            f"{row.ttft_ms:.1f} ms", f"{row.tokens_per_s:.1f}",
            f"{row.energy_j_per_token * 1000:.2f} mJ" if row.energy_j_per_token is not None
            else "not exposed"))
        if row.warm_note:
            notes.append(f"{row.device}: no warm load: {row.warm_note}")
        if row.energy_note:
            notes.append(f"{row.device}: energy: {row.energy_note}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            for line in lines]
    text.append(f"model {report.model}; {report.max_new_tokens} new tokens per run, greedy, "
                f"median of {report.runs} runs")
    return "\n".join(text + notes)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def parse_devices(value: str) -> list[str]:
    """Parse the --devices option ("NPU,GPU,CPU") into a list of upper-case names."""
    devices = [d.strip().upper() for d in value.split(",") if d.strip()]
    unknown = [d for d in devices if d not in ("CPU", "GPU", "NPU")]
    if not devices or unknown:
        raise ValueError(f"--devices must list CPU, GPU or NPU separated by commas, got "
                         f"{value!r}")
    return list(dict.fromkeys(devices))
