"""The export child: converts a Hugging Face model to an OpenVINO IR folder.

Run as ``python -m famulus.daemon.model.export SRC DEST --weight-format int4|int8 --kind
llm|vlm`` by `famulus model import` (daemon/model/importer.py), in an interpreter with the
`export` extra. This is the only famulus module that imports transformers and torch or
runs optimum-intel, so the daemon core stays free of them.

Lines on stderr that start with ``famulus-export:`` are for the parent. Each is a stage
(``stage NAME: detail``) or the final ``error: MESSAGE``, and all other stderr lines are
library output. On success the last stdout line is a JSON object that describes the
result. The IR is written into a temporary folder next to DEST, validated, and renamed to
DEST only at the end, so a failed or interrupted export leaves no partial folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PREFIX = "famulus-export:"

TASKS = {"llm": "text-generation-with-past", "vlm": "image-text-to-text"}

# optimum-intel's default int4 group size. NNCF rejects a group size that does not divide a
# layer's input size, so a model with such a layer (the tiny test model, hidden size 64)
# gets the largest power of two below 128 that divides them all.
INT4_GROUP_SIZE = 128
MIN_GROUP_SIZE = 16


class ExportError(Exception):
    """The export failed for a reason the user can fix; the message explains how."""


def stage(name: str, detail: str = "") -> None:
    print(f"{PREFIX} stage {name}: {detail}".rstrip(": "), file=sys.stderr, flush=True)


def read_config(src: Path) -> dict[str, Any]:
    config_file = src / "config.json"
    if not src.is_dir():
        raise ExportError(f"source folder {src} does not exist; pass a local Hugging Face "
                          "model folder (with config.json) or a hub id")
    if not config_file.is_file():
        raise ExportError(f"{src} has no config.json, so it is not a Hugging Face model "
                          "folder; pass the folder that contains config.json and the weights")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{config_file} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{config_file} is not a JSON object")
    return data


def weight_sizes(config: dict[str, Any]) -> list[int]:
    """Return the input sizes of the text model's linear layers found in `config`."""
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    sizes = []
    for key in ("hidden_size", "intermediate_size"):
        value = text.get(key)
        if isinstance(value, int) and value > 0:
            sizes.append(value)
    heads, head_dim = text.get("num_attention_heads"), text.get("head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int) and heads > 0 and head_dim > 0:
        sizes.append(heads * head_dim)
    return sizes


def int4_group_size(config: dict[str, Any]) -> int:
    """Pick the largest power of two up to 128 that divides every linear layer's input size."""
    common = 0
    for size in weight_sizes(config):
        common = math.gcd(common, size)
    if common == 0:
        return INT4_GROUP_SIZE
    group = INT4_GROUP_SIZE
    while group > MIN_GROUP_SIZE and common % group:
        group //= 2
    if common % group:
        raise ExportError(f"no int4 group size of at least {MIN_GROUP_SIZE} divides the layer "
                          f"sizes {weight_sizes(config)}; import with --weight-format int8")
    return group


def quantization_options(weight_format: str, config: dict[str, Any],
                         group_size: int | None = None) -> list[str]:
    """Return the optimum-cli options that select the weight compression.

    `group_size` applies to int4 only: None picks one with `int4_group_size`, and -1 means
    one scale per output channel.
    """
    if weight_format == "int8":
        return ["--weight-format", "int8"]
    if group_size is None:
        group_size = int4_group_size(config)
    # Symmetric int4 on every layer NNCF allows (ratio 1.0), the form the NPU plugin
    # prefers. The embeddings and the output layer keep NNCF's int8 backup precision.
    return ["--weight-format", "int4", "--sym", "--ratio", "1.0",
            "--group-size", str(group_size)]


def convert(src: str, out: Path, kind: str, weight_format: str, config: dict[str, Any],
            group_size: int | None = None) -> list[str]:
    """Export `src` into `out` with optimum-cli and return the compression options used.

    optimum-cli is the documented interface: its Python function `main_export` alone does
    not compress the weights of models under 1B parameters (optimum-intel 2.2), and the
    step that does is private. It runs in a child of this process with this interpreter,
    and its output goes to this process's stderr.
    """
    options = quantization_options(weight_format, config, group_size)
    stage("export", f"{TASKS[kind]} with {' '.join(options)}")
    cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino",
           "--model", src, "--task", TASKS[kind], *options, str(out)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=None,
                          check=False)
    if proc.returncode != 0:
        raise ExportError(f"optimum-cli export openvino failed with exit code "
                          f"{proc.returncode}; its output above names the cause")
    return options


def ensure_tokenizer(src: str, out: Path) -> None:
    """Write the tokenizer and detokenizer IR if the export did not."""
    if (out / "openvino_tokenizer.xml").is_file() and (out / "openvino_detokenizer.xml").is_file():
        return
    import openvino
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    stage("tokenizer", "converting the tokenizer to openvino_tokenizer.xml and "
          "openvino_detokenizer.xml")
    hf_tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer, detokenizer = convert_tokenizer(hf_tokenizer, with_detokenizer=True)
    openvino.save_model(tokenizer, out / "openvino_tokenizer.xml")
    openvino.save_model(detokenizer, out / "openvino_detokenizer.xml")


def ensure_generation_config(src: str, out: Path) -> None:
    """Write generation_config.json from the model config when the source has none."""
    if (out / "generation_config.json").is_file():
        return
    from transformers import AutoConfig, GenerationConfig

    stage("generation-config", "the source has no generation_config.json; deriving one "
          "from config.json")
    model_config = AutoConfig.from_pretrained(src)
    text_config = getattr(model_config, "text_config", None) or model_config
    GenerationConfig.from_model_config(text_config).save_pretrained(out)


# Model types whose language model is saved as a MistralForCausalLM folder before an llm
# export, because VLMPipeline rejects the whole model (openvino-genai 2026.4).
TEXT_MODEL_TYPES = {"mistral3": "MistralForCausalLM"}
# Files that describe the tokenizer and the chat template, copied with the text model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


def text_weight_name(name: str) -> str | None:
    """Map a weight of a mistral3 checkpoint to its MistralForCausalLM name, or None.

    Checkpoints name the language model `language_model.model.*` (the published Mistral
    Small 3.1 files) or `model.language_model.*` (transformers 5); both become `model.*`.
    The output layer is `language_model.lm_head.*` or `lm_head.*`.
    """
    if name.startswith("lm_head."):
        return name
    marker = "language_model."
    if marker not in name:
        return None  # the vision tower or the projector
    rest = name.rsplit(marker, 1)[1]
    return rest if rest.startswith(("model.", "lm_head.")) else "model." + rest


def extract_text_model(src: Path, out: Path) -> None:
    """Write the language model of an image-text-to-text checkpoint to `out`.

    Weights are copied one input shard at a time, so the memory needed is about one shard,
    not the whole model.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ExportError(f"{src} has no .safetensors weights; only safetensors checkpoints "
                          "can be reduced to their language model")
    stage("extract", f"language model of {src} as {TEXT_MODEL_TYPES['mistral3']}")
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards):
        tensors = {}
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                target = text_weight_name(name)
                if target is not None:
                    tensors[target] = f.get_tensor(name)
        if not tensors:
            continue
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
    if not weight_map:
        raise ExportError(f"{src} has no language model weights (no names with "
                          "`language_model.`)")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2), encoding="utf-8")

    text_config = AutoConfig.from_pretrained(src).text_config
    text_config.architectures = [TEXT_MODEL_TYPES["mistral3"]]
    if "lm_head.weight" not in weight_map:
        # transformers leaves out an output layer that is tied to the embeddings.
        text_config.tie_word_embeddings = True
    text_config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    processor_template = src / "chat_template.json"
    if not (out / "chat_template.jinja").exists() and processor_template.is_file():
        # A processor keeps the template in chat_template.json; a tokenizer reads .jinja.
        template = json.loads(processor_template.read_text(encoding="utf-8"))["chat_template"]
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")


def install(tmp: Path, dest: Path) -> None:
    """Move the finished folder `tmp` to `dest`, replacing an earlier import there."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.replaced-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run(src: str, dest: Path, kind: str, weight_format: str,
        group_size: int | None = None) -> dict[str, Any]:
    """Export, check and install one model; return the description printed on stdout."""
    import openvino

    from famulus.daemon.model.validate import ModelInvalid, check_model

    local = Path(src).expanduser()
    # The same rule as the importer's: `owner/name` that is not a folder here is a hub id.
    is_local = local.exists() or src.startswith((".", "/", "~")) or src.count("/") != 1
    stage("read", f"config of {src}")
    config = read_config(local) if is_local else {}
    source = str(local.resolve()) if is_local else src
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.import-", dir=dest.parent))
    # mkdtemp creates the folder private (0700); the model folder gets the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    text_type = TEXT_MODEL_TYPES.get(str(config.get("model_type")))
    try:
        started = time.monotonic()
        if is_local and kind == "llm" and text_type is not None:
            source = str(tmp / ".text-model")
            extract_text_model(local, Path(source))
        try:
            options = convert(source, tmp, kind, weight_format, config, group_size)
        except ExportError as exc:
            if is_local:
                raise
            raise ExportError(f"{exc}. {src} is not a local folder, so it was fetched from "
                              "the Hugging Face hub: without network access, download the "
                              "model folder elsewhere and import the local folder") from exc
        ensure_tokenizer(source, tmp)
        ensure_generation_config(source, tmp)
        if text_type is not None:
            shutil.rmtree(tmp / ".text-model", ignore_errors=True)
        stage("validate", str(dest))
        try:
            check_model(tmp, kind)
        except ModelInvalid as exc:
            raise ExportError(f"the export of {src} is incomplete: {exc}") from exc
        install(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stage("done", f"{dest} in {time.monotonic() - started:.1f} s")
    return {"path": str(dest), "kind": kind, "weight_format": weight_format,
            "options": options, "source": str(local.resolve()) if is_local else src,
            "openvino_version": openvino.get_version()}


def _terminate(signum: int, _frame: Any) -> None:
    # Turn SIGTERM into SystemExit so that `run` removes its temporary folder.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m famulus.daemon.model.export",
                                     description="Convert a Hugging Face model to OpenVINO IR.")
    parser.add_argument("src", help="local Hugging Face model folder or hub id")
    parser.add_argument("dest", type=Path, help="output folder (replaced when present)")
    parser.add_argument("--weight-format", choices=["int4", "int8"], required=True)
    parser.add_argument("--kind", choices=sorted(TASKS), default="llm")
    parser.add_argument("--group-size", type=int,
                        help="int4 only: weights per scale, or -1 for one per output channel "
                        "(default: the largest power of two up to 128 that fits every layer)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # Keep stdout for the result line: libraries that print go to stderr.
    result_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        result = run(args.src, args.dest, args.kind, args.weight_format, args.group_size)
    except ExportError as exc:
        print(f"{PREFIX} error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        print(f"{PREFIX} error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    result_out.write(json.dumps(result) + "\n")
    result_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
