"""Tiny random LTX-Video pipelines for tests: real diffusers classes, untrained weights.

The weights are random, so the frames are noise; the point is the real code path (text
encoder, denoising loop, VAE decode) at a size that runs in seconds on a CPU. Building one
imports torch, so only tests and benchmarks of the video worker use this module.
"""

from __future__ import annotations

from pathlib import Path

# Small enough for seconds on a CPU; the VAE below compresses 4x in space and 4x in time.
TEXT_DIM = 32
LATENT_CHANNELS = 8


def _tokenizer(folder: Path) -> None:
    """Train a tiny word-level tokenizer locally (no model hub) and save it with the pipeline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = ("a red fox runs through snow at dusk the camera pans slowly over a quiet "
             "harbour with boats and cranes in morning light").split()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator([" ".join(words)] * 4, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                      eos_token="</s>", unk_token="<unk>",
                                      model_max_length=128)
    wrapped.save_pretrained(folder)


def build_tiny_ltx(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random LTXPipeline to `folder` with save_pretrained and return it."""
    import torch
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=1,
        patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=TEXT_DIM)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=64, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    _tokenizer(folder / "tokenizer")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                       text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder
