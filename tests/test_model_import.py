"""`famulus model import` and model validation, with tiny random models built in the suite.

The exporter needs the `export` extra (optimum-intel and torch), which lives in its own
interpreter (.venv-export, made by .ci/setup, or $FAMULUS_EXPORT_PYTHON). Without it the
export tests fail under CI=true and are skipped with the reason elsewhere. The validation
and bad-source tests need no exporter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from famulus.daemon.demo import isolated_env
from famulus.daemon.model.registry import ModelNotFound, read_registry, register, resolve
from famulus.daemon.model.supervisor import ModelHost
from famulus.daemon.model.validate import (
    COMMON_FILES,
    MODEL_FILES,
    ModelInvalid,
    check_model,
    detect_kind,
)
from famulus.ipc.protocol import Topic
from tests.conftest import DaemonHome, processes_with_home, wait_for_none
from tests.tiny_models import EXPORT_PYTHON_ENV, build_with, find_export_python

EXPORT_TIMEOUT_S = 600
IMPORT_COMMAND = "famulus model import SRC --weight-format int8"


def export_python() -> str:
    """Return the export interpreter, or fail (CI) or skip (elsewhere) with the reason."""
    python = find_export_python()
    if python is not None:
        return python
    configured = os.environ.get(EXPORT_PYTHON_ENV)
    where = f"{EXPORT_PYTHON_ENV}={configured} does not exist" if configured else \
        f"{EXPORT_PYTHON_ENV} is not set and .venv-export is missing"
    reason = (f"no export interpreter ({where}); run `bash .ci/setup`, which creates "
              ".venv-export with the export extra, or point the variable at one")
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def models_dir(root: Path) -> Path:
    return root / "data" / "famulus" / "models"


def famulus_import(root: Path, src: Path | str, *args: str,
                   python: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `famulus model import` as a user would, in the home `root`."""
    env = isolated_env(root)
    if python is not None:
        env[EXPORT_PYTHON_ENV] = python
    return subprocess.run([sys.executable, "-m", "famulus.daemon.cli", "model", "import",
                           str(src), *args], env=env, capture_output=True, text=True,
                          timeout=EXPORT_TIMEOUT_S)


def element_types(xml: Path) -> set[str]:
    """Return the element types that occur in an OpenVINO IR file."""
    text = xml.read_text(encoding="utf-8")
    return {part.split('"', 1)[0] for part in text.split('element_type="')[1:]}


# -- fixtures: tiny models and imports, built once per module ----------------------------


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_with(export_python(), "mistral", tmp_path_factory.mktemp("src") / "TinyMistral")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_with(export_python(), "llava", tmp_path_factory.mktemp("src") / "TinyLlava")


@pytest.fixture(scope="module")
def import_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose model folder receives the imports of this module."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def imported(import_home: Path, tiny_mistral: Path) -> dict[str, Path]:
    """Import the tiny Mistral with int8 and with int4 weights; return the folders."""
    python = export_python()
    folders = {}
    for weight_format in ("int8", "int4"):
        name = f"tiny-mistral-{weight_format}"
        proc = famulus_import(import_home, tiny_mistral, "--weight-format", weight_format,
                              "--name", name, python=python)
        assert proc.returncode == 0, proc.stderr
        folders[weight_format] = models_dir(import_home) / name
    return folders


# -- import of a tiny Mistral -------------------------------------------------------------


def test_import_registers_entry(import_home: Path, imported: dict[str, Path]) -> None:
    registry = read_registry(models_dir(import_home))
    for weight_format, folder in imported.items():
        entry = registry[f"tiny-mistral-{weight_format}"]
        assert entry["path"] == str(folder)
        assert entry["format"] == "openvino"
        assert entry["kind"] == "llm"
        assert entry["weight_format"] == weight_format
        assert entry["source"].endswith("TinyMistral")
        assert entry["openvino_version"].startswith("20")


def test_import_writes_complete_folder(imported: dict[str, Path]) -> None:
    for folder in imported.values():
        for name in (*MODEL_FILES["llm"], *COMMON_FILES):
            assert (folder / name).is_file(), f"{name} missing in {folder}"
        check_model(folder, "llm")
        leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
        assert leftovers == []


def test_import_compresses_weights(imported: dict[str, Path]) -> None:
    # optimum's main_export alone leaves a model this small in f32; the import must not.
    int8_types = element_types(imported["int8"] / "openvino_model.xml")
    int4_types = element_types(imported["int4"] / "openvino_model.xml")
    assert "u8" in int8_types
    assert "i4" in int4_types or "u4" in int4_types


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_imported_folder_generates_in_host(imported: dict[str, Path],
                                           weight_format: str) -> None:
    host = ModelHost({"path": str(imported[weight_format]), "devices": ["CPU"],
                      "cache_dir": "", "npu_max_prompt_len": 1024,
                      "npu_min_response_len": 128, "load_timeout_s": 120}, backoff_s=0.1)
    try:
        state = host.ensure_loaded()
        assert state.state == "loaded"
        assert state.device == "CPU"
        messages = [{"role": "system", "content": "Summarize."},
                    {"role": "user", "content": "The ferry leaves at nine."}]
        reply = host.generate(messages, max_new_tokens=12, repetition_penalty=1.1,
                              timeout_s=60)
        assert 0 < reply["tokens"] <= 12
        assert reply["finish"] in ("stop", "length")
    finally:
        host.stop()


def test_daemon_summarizes_with_import(import_home: Path, imported: dict[str, Path],
                                       model_path: Path) -> None:
    home = DaemonHome(import_home, model_path)
    home.config_file.write_text(textwrap.dedent(f"""\
        [watch]
        folders = [{str(home.inbox)!r}]

        [model]
        name = "tiny-mistral-int8"
        devices = ["CPU"]
        max_new_tokens = 24
        """), encoding="utf-8")
    try:
        home.start()
        model = home.status()["model"]
        assert model["state"] == "loaded", model
        with home.client() as client:
            job = client.call("summarize", {"text": "The ferry leaves at nine."})["job"]
            assert home.log is not None
            done = home.log.wait(lambda e: e.topic in (Topic.JOB_DONE, Topic.JOB_FAILED)
                                 and e.body["job"] == job, 120, "the summarize job to end")
            assert done.topic == Topic.JOB_DONE, done.body
            result = client.call("job", {"id": job})
        assert result["state"] == "done"
        assert result["result"]["model"] == "tiny-mistral-int8"
        assert result["result"]["device"] == "CPU"
    finally:
        home.stop()


def test_reimport_replaces_folder(import_home: Path, imported: dict[str, Path],
                                  tiny_mistral: Path) -> None:
    folder = imported["int8"]
    marker = folder / "stale-file"
    marker.write_text("from the earlier import", encoding="utf-8")
    proc = famulus_import(import_home, tiny_mistral, "--weight-format", "int8", "--name",
                          "tiny-mistral-int8", python=export_python())
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    check_model(folder, "llm")
    assert "stage export" in proc.stderr


def test_channel_wise_int4_import(import_home: Path, tiny_mistral: Path) -> None:
    proc = famulus_import(import_home, tiny_mistral, "--weight-format", "int4",
                          "--group-size", "-1", "--name", "tiny-mistral-int4-cw",
                          python=export_python())
    assert proc.returncode == 0, proc.stderr
    entry = read_registry(models_dir(import_home))["tiny-mistral-int4-cw"]
    assert entry["export_options"][-2:] == ["--group-size", "-1"]
    types = element_types(Path(entry["path"]) / "openvino_model.xml")
    assert "i4" in types or "u4" in types


def test_group_size_with_int8_rejected(tmp_path: Path, tiny_source: Path) -> None:
    proc = famulus_import(tmp_path, tiny_source, "--weight-format", "int8", "--group-size",
                          "64")
    assert proc.returncode == 1
    assert "group size 64 is invalid; it applies to int4 only" in proc.stderr
    assert_nothing_left(tmp_path)


# -- import of a tiny LLaVA ---------------------------------------------------------------


def test_llava_import_runs_in_vlm_pipeline(import_home: Path, tiny_llava: Path) -> None:
    import numpy as np
    import openvino
    import openvino_genai

    proc = famulus_import(import_home, tiny_llava, "--weight-format", "int8",
                          python=export_python())
    assert proc.returncode == 0, proc.stderr
    entry = read_registry(models_dir(import_home))["tinyllava"]
    assert entry["kind"] == "vlm"
    folder = Path(entry["path"])
    check_model(folder, "vlm")
    assert detect_kind(folder) == "vlm"

    pipe = openvino_genai.VLMPipeline(str(folder), "CPU")
    image = np.random.default_rng(0).integers(0, 256, (1, 48, 40, 3), dtype=np.uint8)
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = 8
    result = pipe.generate("Describe the image.", images=[openvino.Tensor(image)],
                           generation_config=config)
    assert 0 < result.perf_metrics.get_num_generated_tokens() <= 8


def test_daemon_describes_image_with_imported_llava(import_home: Path, tiny_llava: Path,
                                                    model_path: Path) -> None:
    from PIL import Image

    proc = famulus_import(import_home, tiny_llava, "--weight-format", "int8", "--name",
                          "tiny-llava-vision", python=export_python())
    assert proc.returncode == 0, proc.stderr
    home = DaemonHome(import_home, model_path,
                      extra='vision = "tiny-llava-vision"\ndevices = ["CPU"]\n')
    try:
        home.start()
        photo = home.inbox / "photo.png"
        Image.new("RGB", (64, 48), (200, 40, 40)).save(photo)
        assert home.log is not None
        event = home.log.wait(lambda e: e.topic in (Topic.DOCUMENT_SUMMARIZED,
                                                    Topic.DOCUMENT_FAILED)
                              and e.body["path"] == str(photo), 180, "the image's outcome")
        assert event.topic == Topic.DOCUMENT_SUMMARIZED, event.body
        assert event.body["model"] == "tiny-llava-vision"
        assert event.body["summary"]
        assert home.status()["vision"]["state"] == "loaded"
        listed = subprocess.run(home.command("model", "list", "--json"), env=home.env,
                                capture_output=True, text=True, timeout=60, check=True)
        rows = {row["name"]: row for row in json.loads(listed.stdout)}
        assert rows["tiny-llava-vision"]["kind"] == "vlm"
        assert rows["tiny-llava-vision"]["vision"] is True
        assert rows["tiny-llava-vision"]["state"] == "loaded"
    finally:
        home.stop()


# -- the language model of a mistral3 model (Mistral Small 3.1's type) --------------------

# Greedy tokens of the original PyTorch model, computed in the export interpreter.
REFERENCE_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForImageTextToText, AutoTokenizer
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
ids = AutoTokenizer.from_pretrained(sys.argv[1])(sys.argv[2], add_special_tokens=False).input_ids
with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, min_new_tokens=4,
                         do_sample=False)
print(json.dumps({"input": ids, "output": out[0, len(ids):].tolist()}))
"""


def test_mistral3_language_model_import(tmp_path: Path) -> None:
    import numpy as np
    import openvino
    import openvino_genai

    python = export_python()
    src = build_with(python, "mistral3", tmp_path / "Tiny-Mistral3")
    proc = famulus_import(tmp_path, src, "--weight-format", "int8", "--kind", "llm",
                          python=python)
    assert proc.returncode == 0, proc.stderr
    assert "stage extract" in proc.stderr
    entry = read_registry(models_dir(tmp_path))["tiny-mistral3"]
    assert entry["kind"] == "llm"
    folder = Path(entry["path"])
    check_model(folder, "llm")
    assert not (folder / ".text-model").exists()

    reference = subprocess.run([python, "-c", REFERENCE_SCRIPT, str(src),
                                "The ferry leaves at nine."], capture_output=True, text=True,
                               timeout=EXPORT_TIMEOUT_S)
    assert reference.returncode == 0, reference.stderr
    expected = json.loads(reference.stdout.strip().splitlines()[-1])
    pipe = openvino_genai.LLMPipeline(str(folder), "CPU")
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = 4
    ids = openvino.Tensor(np.array([expected["input"]], dtype=np.int64))
    tokens = list(pipe.generate(ids, config).tokens[0])
    # Random weights leave near-ties that int8 rounding can flip after a few steps, so only
    # the first tokens are compared. A wrong weight mapping changes the first one.
    assert tokens[:3] == expected["output"][:3]


# -- bad sources and a missing exporter ----------------------------------------------------


def assert_nothing_left(root: Path) -> None:
    folder = models_dir(root)
    assert read_registry(folder) == {}
    assert not folder.exists() or list(folder.iterdir()) == []


def test_missing_source_folder_fails(tmp_path: Path) -> None:
    proc = famulus_import(tmp_path, tmp_path / "no-such-model", "--weight-format", "int4")
    assert proc.returncode == 1
    assert f"source folder {tmp_path / 'no-such-model'} does not exist" in proc.stderr
    assert_nothing_left(tmp_path)


def test_source_without_config_fails(tmp_path: Path) -> None:
    src = tmp_path / "weights-only"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"\0" * 16)
    proc = famulus_import(tmp_path, src, "--weight-format", "int8")
    assert proc.returncode == 1
    assert "has no config.json" in proc.stderr
    assert_nothing_left(tmp_path)


def test_missing_exporter_explains_install(tmp_path: Path, tiny_source: Path) -> None:
    proc = famulus_import(tmp_path, tiny_source, "--weight-format", "int8",
                          python=str(tmp_path / "missing" / "python"))
    assert proc.returncode == 1
    assert "could not be started" in proc.stderr
    assert "famulus[export]" in proc.stderr
    assert EXPORT_PYTHON_ENV in proc.stderr
    assert_nothing_left(tmp_path)


def test_exporter_without_optimum_names_module(tmp_path: Path, tiny_source: Path) -> None:
    # The daemon's own interpreter has torch (video extra) but not optimum-intel.
    proc = famulus_import(tmp_path, tiny_source, "--weight-format", "int8",
                          python=sys.executable)
    assert proc.returncode == 1
    assert "cannot import optimum.intel" in proc.stderr
    assert "famulus[export]" in proc.stderr
    assert_nothing_left(tmp_path)


def test_failed_export_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "broken"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mistral"}), encoding="utf-8")
    proc = famulus_import(tmp_path, src, "--weight-format", "int8", python=export_python())
    assert proc.returncode == 1
    assert "model import failed: the export failed" in proc.stderr
    assert_nothing_left(tmp_path)


def test_interrupted_import_leaves_nothing(tmp_path: Path, tiny_mistral: Path) -> None:
    env = {**isolated_env(tmp_path), EXPORT_PYTHON_ENV: export_python()}
    proc = subprocess.Popen([sys.executable, "-m", "famulus.daemon.cli", "model", "import",
                             str(tiny_mistral), "--weight-format", "int8"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "stage export" in line:
                break
        assert any("stage export" in line for line in lines), "".join(lines)
        # SIGINT is what Ctrl-C sends.
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "model import cancelled; nothing was registered" in rest
    assert wait_for_none(lambda: processes_with_home(tmp_path), 30) == []
    assert_nothing_left(tmp_path)


def test_name_of_pulled_model_rejected(tmp_path: Path, tiny_source: Path) -> None:
    proc = famulus_import(tmp_path, tiny_source, "--weight-format", "int8", "--name",
                          "smollm2-135m-instruct")
    assert proc.returncode == 1
    assert "choose another one with --name" in proc.stderr


def test_mistral3_vlm_rejected_with_hint(tmp_path: Path) -> None:
    src = tmp_path / "Mistral-Small-3.1"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mistral3"}), encoding="utf-8")
    proc = famulus_import(tmp_path, src, "--weight-format", "int4")
    assert proc.returncode == 1
    assert "'mistral3', which VLMPipeline rejects" in proc.stderr
    assert "with --kind llm" in proc.stderr
    assert_nothing_left(tmp_path)


@pytest.fixture
def tiny_source(tmp_path: Path) -> Path:
    """A folder that passes the source checks; the tests fail before any export."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mistral"}), encoding="utf-8")
    return src


# -- validation of model folders ------------------------------------------------------------


def complete_folder(root: Path, kind: str) -> Path:
    """Create a folder with every file that `kind` needs (empty: only names are checked)."""
    folder = root / f"model-{kind}"
    folder.mkdir()
    for name in (*MODEL_FILES[kind], *COMMON_FILES):
        (folder / name).write_bytes(b"")
    return folder


@pytest.mark.parametrize("kind", ["llm", "vlm"])
def test_each_missing_file_named(tmp_path: Path, kind: str) -> None:
    folder = complete_folder(tmp_path, kind)
    check_model(folder, kind)
    for name in (*MODEL_FILES[kind], *COMMON_FILES):
        moved = tmp_path / name
        (folder / name).rename(moved)
        with pytest.raises(ModelInvalid) as caught:
            check_model(folder, kind)
        message = str(caught.value)
        assert name in message
        assert IMPORT_COMMAND in message
        moved.rename(folder / name)


def test_model_invalid_is_model_not_found() -> None:
    assert issubclass(ModelInvalid, ModelNotFound)


def test_gguf_without_magic_rejected(tmp_path: Path, model_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(ModelInvalid, match="not a GGUF file"):
        check_model(fake, "llm")
    check_model(model_path, "llm")


def test_resolve_rejects_incomplete_registered(tmp_path: Path) -> None:
    folder = complete_folder(tmp_path, "llm")
    (folder / "openvino_tokenizer.xml").unlink()
    register(tmp_path, "half", {"path": str(folder), "format": "openvino", "kind": "llm"})
    with pytest.raises(ModelInvalid, match="openvino_tokenizer.xml missing"):
        resolve(tmp_path, "half", "")


def test_resolve_rejects_incomplete_path(tmp_path: Path) -> None:
    folder = complete_folder(tmp_path, "vlm")
    (folder / "generation_config.json").unlink()
    with pytest.raises(ModelInvalid, match="generation_config.json missing"):
        resolve(tmp_path, "unused", str(folder))


@pytest.fixture
def incomplete_home(tmp_path: Path, model_path: Path) -> Iterator[DaemonHome]:
    folder = complete_folder(tmp_path, "llm")
    (folder / "openvino_detokenizer.xml").unlink()
    home = DaemonHome(tmp_path / "home", folder)
    yield home
    home.stop()


def test_daemon_reports_missing_detokenizer(incomplete_home: DaemonHome) -> None:
    incomplete_home.start(wait_model=False)
    model = incomplete_home.status()["model"]
    assert model["state"] == "missing"
    assert "openvino_detokenizer.xml missing" in model["error"]
    assert IMPORT_COMMAND in model["error"]


def test_config_check_names_missing_file(incomplete_home: DaemonHome) -> None:
    proc = subprocess.run(incomplete_home.command("config", "check"), env=incomplete_home.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "openvino_detokenizer.xml missing" in proc.stderr


def test_incomplete_copy_of_import_rejected(tmp_path: Path,
                                            imported: dict[str, Path]) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(imported["int8"], copy)
    (copy / "openvino_tokenizer.xml").unlink()
    with pytest.raises(ModelInvalid, match="openvino_tokenizer.xml missing"):
        check_model(copy, "llm")


def test_fifo_as_model_rejected(tmp_path: Path) -> None:
    # Regression: a FIFO was reported as missing, and opening it would block the host.
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ModelInvalid, match="neither a regular file nor a folder"):
        check_model(fifo, "llm")
