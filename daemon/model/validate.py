"""Checks that a model file or folder has everything OpenVINO GenAI needs to load it.

A folder that lacks its tokenizer IR, detokenizer IR or generation config fails deep inside
the pipeline constructor with a message that does not say what is missing. These checks run
before a load (`registry.resolve`) and after an import, and name the missing file and the
command that produces it.
"""

from __future__ import annotations

from pathlib import Path

from famulus.daemon.model.registry import ModelNotFound

KINDS = ("llm", "vlm")

GGUF_MAGIC = b"GGUF"

# Files that both kinds of IR folder need: the tokenizer and detokenizer that
# openvino_tokenizers converts, and the generation defaults (stop tokens among them).
COMMON_FILES = ("openvino_tokenizer.xml", "openvino_detokenizer.xml", "generation_config.json")

MODEL_FILES = {
    "llm": ("openvino_model.xml", "openvino_model.bin"),
    # The names optimum-intel gives the parts of an image-text-to-text export, as
    # VLMPipeline reads them (openvino-genai 2026.4).
    "vlm": ("openvino_language_model.xml", "openvino_vision_embeddings_model.xml",
            "openvino_text_embeddings_model.xml"),
}


class ModelInvalid(ModelNotFound):
    """A model file or folder exists but cannot be loaded as it is."""


def import_command(path: Path, kind: str) -> str:
    """Return the command that writes a complete folder for `path` (a source is a guess)."""
    flag = " --kind vlm" if kind == "vlm" else ""
    return f"famulus model import SRC --weight-format int8 --name {path.name}{flag}"


def detect_kind(path: Path) -> str:
    """Return "vlm" for a folder with a VLM's language model IR, else "llm"."""
    return "vlm" if (path / MODEL_FILES["vlm"][0]).is_file() else "llm"


def check_model(path: Path, kind: str = "llm") -> None:
    """Raise ModelInvalid when `path` is not a loadable GGUF file or IR folder of `kind`."""
    if kind not in KINDS:
        raise ModelInvalid(f"model kind {kind!r} at {path} is invalid; use one of "
                           f"{', '.join(KINDS)}")
    if path.is_file():
        _check_gguf(path)
        return
    if path.exists() and not path.is_dir():
        # A FIFO or a device would block or stream forever when the host opens it.
        raise ModelInvalid(f"model {path} is neither a regular file nor a folder; point it at "
                           "a .gguf file or an OpenVINO IR folder")
    if not path.is_dir():
        raise ModelNotFound(f"model {path} does not exist")
    missing = [name for name in (*MODEL_FILES[kind], *COMMON_FILES)
               if not (path / name).is_file()]
    if missing:
        raise ModelInvalid(
            f"model folder {path} is incomplete: {', '.join(missing)} missing. Convert the "
            f"Hugging Face folder of this model again with `{import_command(path, kind)}`, "
            "which writes the model IR, openvino_tokenizer.xml, openvino_detokenizer.xml "
            "and generation_config.json")


def _check_gguf(path: Path) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelInvalid(f"model file {path} is unreadable: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise ModelInvalid(
            f"model file {path} is not a GGUF file (it does not start with b'GGUF'). Point "
            "model.path at a .gguf file or an OpenVINO IR folder; a Hugging Face folder is "
            "converted with `famulus model import SRC --weight-format int8`")
