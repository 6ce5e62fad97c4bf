"""Build the tiny random LLaVA of tests/tiny_models.py and export it to OpenVINO IR.

`python tiny_llava.py DEST` writes the Hugging Face folder to DEST/hf and the IR to DEST/ov
with `optimum-cli export openvino --task image-text-to-text`. It needs torch, transformers
and optimum-intel, so the tests run it with the interpreter of the `export` extra
(FAMULUS_EXPORT_PYTHON), never inside the test process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import build_llava  # noqa: E402  (the test folder is no package here)


def never_end(folder: Path) -> None:
    """Make greedy decoding run to max_new_tokens: the cancel test stops a long generation.

    A zero output row gives the end-of-sequence token the logit 0. The largest of the other
    random logits is positive unless all of the roughly 500 are negative.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos].zero_()
    model.save_pretrained(folder)


def export(source: Path, dest: Path) -> Path:
    """Convert the model in `source` to OpenVINO IR in `dest` with optimum-cli."""
    subprocess.run(
        [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino",
         "--model", str(source), "--task", "image-text-to-text", "--weight-format", "fp32",
         str(dest)], check=True)
    return dest


if __name__ == "__main__":
    root = Path(sys.argv[1])
    hf = build_llava(root / "hf")
    never_end(hf)
    export(hf, root / "ov")
