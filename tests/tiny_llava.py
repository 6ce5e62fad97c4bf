"""A tiny random LLaVA for the vision tests: real transformers classes, untrained weights.

`python tiny_llava.py DEST` builds the model with save_pretrained in DEST/hf and exports it
to OpenVINO IR in DEST/ov with `optimum-cli export openvino --task image-text-to-text`. It
needs torch, transformers and optimum-intel, so the tests run it with the interpreter of the
`export` extra (FAMULUS_EXPORT_PYTHON), never inside the test process.

The weights are random, so the descriptions are random tokens. What counts is the real path:
image preprocessing, vision encoder, projector and text decoder in `VLMPipeline`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# CLIP vision tower: 32x32 images in 8x8 patches, so each image becomes 16 tokens.
IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_TOKEN = "<image>"
# LLaVA 1.5's prompt format: "USER: ..." and "ASSISTANT: ..." lines.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% else %}ASSISTANT: {{ message['content'] }}</s>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
WORDS = ("a photo of the red square on white paper with text a cat a dog blue sky green "
         "tree small large picture image shows there is and in on of describe what it")


def _tokenizer() -> object:
    """Train a tiny byte-level BPE tokenizer locally, with LLaVA's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([WORDS, "USER: ASSISTANT:\n"] * 8, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=8192, chat_template=CHAT_TEMPLATE)


def build_llava(dest: Path, seed: int = 0) -> Path:
    """Write a tiny random LlavaForConditionalGeneration with its processor to `dest`."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        MistralConfig,
    )

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)  # type: ignore[attr-defined]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE_SIZE,
                              patch_size=PATCH_SIZE, projection_dim=32)
    text = MistralConfig(vocab_size=len(tokenizer), hidden_size=64,  # type: ignore[arg-type]
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=image_token_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    # A zero output row gives the end-of-sequence token the logit 0, below the largest of
    # the other random logits, so greedy decoding runs to max_new_tokens. The cancel test
    # needs such a long generation to stop it in the middle.
    with torch.no_grad():
        model.lm_head.weight[2].zero_()
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 3
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE,
                                                      "width": IMAGE_SIZE}),
        tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


def export_llava(source: Path, dest: Path) -> Path:
    """Convert the model in `source` to OpenVINO IR in `dest` with optimum-cli."""
    subprocess.run(
        [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino",
         "--model", str(source), "--task", "image-text-to-text", "--weight-format", "fp32",
         str(dest)], check=True)
    return dest


if __name__ == "__main__":
    root = Path(sys.argv[1])
    export_llava(build_llava(root / "hf"), root / "ov")
