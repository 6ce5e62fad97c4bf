"""Tiny random Hugging Face models for the import tests: real classes, untrained weights.

`build_mistral` writes a MistralForCausalLM and `build_llava` a LlavaForConditionalGeneration,
each with a byte-level BPE tokenizer trained locally (no model hub) and a chat template. The
weights are random, so the text they generate is noise. What the tests need is the real
export, load and generate path at a size that takes seconds on a CPU.

Building imports torch and transformers, so it runs in the export interpreter (the venv with
the `export` extra), never in the daemon's. Tests call it as a script:

    EXPORT_PYTHON tests/tiny_models.py mistral|llava DEST
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# Hidden size 64 is divisible by 32 but not by optimum's default int4 group size of 128,
# so the int4 import has to pick a group size that fits.
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
# Above the daemon's default prompt budget (model.max_prompt_tokens = 1536).
MAX_POSITIONS = 4096
SEED = 0

VISION_HIDDEN = 32
IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_TOKEN = "<image>"

# Mistral's instruction format. A system message goes in front of the first user turn, as
# the daemon sends one with every summary request. Content may also be a list of parts
# ({"type": "text" | "image"}), which the LLaVA processor passes.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = namespace(text='') %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set content.text = content.text + '<image>\n' %}"
    "{% elif part['type'] == 'text' %}{% set content.text = content.text + part['text'] %}"
    "{% endif %}{% endfor %}{% set content = content.text %}{% endif %}"
    "{% if message['role'] == 'system' %}{% set system.text = content + '\n\n' %}"
    "{% elif message['role'] == 'user' %}[INST] {{ system.text }}{{ content }} [/INST]"
    "{% set system.text = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ content }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

_TRAINING_TEXT = """\
The quarterly report lists revenue, costs and the plans for the next year.
A red fox runs through the snow at dusk while the camera pans over the harbour.
Meeting notes: the team agreed to ship the release on Friday after the last review.
Summarize the following text in three to five sentences. Use only facts from the text.
"""


def _tokenizer(extra_special: list[str]) -> Any:
    """Train a byte-level BPE tokenizer locally and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", *extra_special]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The full byte alphabet lets any input text encode, including non-ASCII documents.
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TRAINING_TEXT.splitlines() * 8, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>", model_max_length=MAX_POSITIONS, chat_template=CHAT_TEMPLATE,
        additional_special_tokens=["[INST]", "[/INST]", *extra_special])


def _mistral_config(tokenizer: Any) -> Any:
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS, sliding_window=None,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def _generation_config(tokenizer: Any, max_new_tokens: int = 32) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens)


def build_mistral(dest: Path) -> Path:
    """Write a tiny random MistralForCausalLM with its tokenizer to `dest` and return it."""
    import torch
    from transformers import MistralForCausalLM

    torch.manual_seed(SEED)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer([])
    model = MistralForCausalLM(_mistral_config(tokenizer))
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def build_llava(dest: Path) -> Path:
    """Write a tiny random LLaVA (CLIP vision tower, Mistral text model) to `dest`.

    The folder contains the model, its processor (CLIP image processor plus tokenizer) and a
    chat template, as `optimum-cli export openvino --task image-text-to-text` expects.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(SEED)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer([IMAGE_TOKEN])
    vision = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        projection_dim=VISION_HIDDEN)
    config = LlavaConfig(vision_config=vision, text_config=_mistral_config(tokenizer),
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(dest)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                               image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE,
                               # CLIP's class token, which the "default" strategy drops.
                               num_additional_image_tokens=1)
    processor.save_pretrained(dest)
    return dest


BUILDERS = {"mistral": build_mistral, "llava": build_llava}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in BUILDERS:
        print(f"usage: tiny_models.py {'|'.join(BUILDERS)} DEST", file=sys.stderr)
        return 2
    print(BUILDERS[argv[0]](Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
