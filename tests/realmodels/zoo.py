"""The architectures of the real-model sweep: `transformers` models built from tiny configs, with their own losses.

Every entry builds a model from a config (no downloads, no hub access: hidden size <= 64, 2 layers, vocabulary 128,
well under 1 M parameters) and a function that makes the batch of a step (2 x 8 tokens, 32 x 32 images, 0.25 s of
16 kHz audio), labels included, so that ``model(**batch).loss`` is the model's own loss.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["ARCHS", "Arch", "Built", "build"]

Batch = dict[str, torch.Tensor]
VOCAB = 128
B, T = 2, 8

#: Text sizes shared by every text model (names translated by each config's ``attribute_map``).
TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
DECODER = {**TEXT, "num_key_value_heads": 2, "head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
SEQ2SEQ = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}
SPEECH = {
    "vocab_size": 16,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (16, 16, 16),
    "conv_kernel": (10, 3, 3),
    "conv_stride": (5, 4, 4),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "mask_time_length": 2,
    "ctc_zero_infinity": True,
    # LayerDrop, set here rather than taken from the config's default (0.1 today), so the idle-by-design layers are
    # ours by construction whatever a release changes.
    "layerdrop": 0.1,
}
IMAGE = 32


@dataclass(frozen=True)
class Built:
    """A model and the batch of each step."""

    model: torch.nn.Module
    batch: Callable[[int], Batch]


@dataclass(frozen=True)
class Arch:
    """One architecture of the sweep."""

    name: str
    family: str
    make: Callable[[], Built]
    #: checkpointing variants left out, with why (a failure of the model itself, without the guard)
    broken: tuple[tuple[str, str], ...] = ()


def _gen(step: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + step)


def tokens(step: int, labels: str = "lm", num_labels: int = 2) -> Batch:
    """``input_ids`` (2 x 8) and labels: ``"lm"`` the ids themselves, ``"cls"`` one class per row."""
    g = _gen(step)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long)}
    if labels == "lm":
        batch["labels"] = ids.clone()
    elif labels == "cls":
        batch["labels"] = torch.randint(0, num_labels, (B,), generator=g)
    elif labels == "tok":
        batch["labels"] = torch.randint(0, num_labels, (B, T), generator=g)
    return batch


def seq2seq(step: int) -> Batch:
    g = _gen(step)
    return {
        "input_ids": torch.randint(3, VOCAB, (B, T), generator=g),
        "labels": torch.randint(3, VOCAB, (B, T), generator=g),
    }


def images(step: int, num_labels: int = 3) -> Batch:
    g = _gen(step)
    return {
        "pixel_values": torch.randn(B, 3, IMAGE, IMAGE, generator=g),
        "labels": torch.randint(0, num_labels, (B,), generator=g),
    }


def audio(step: int) -> Batch:
    g = _gen(step)
    return {
        "input_values": torch.randn(B, 4000, generator=g),
        "labels": torch.randint(1, 16, (B, 4), generator=g),
    }


def _text(
    cls_name: str, cfg_name: str, labels: str = "lm", omit: tuple[str, ...] = (), **kw: object
) -> Callable[[], Built]:
    def make() -> Built:
        import transformers

        opts = {k: v for k, v in {**TEXT, **kw}.items() if k not in omit}
        cfg = getattr(transformers, cfg_name)(**opts)
        model = getattr(transformers, cls_name)(cfg)
        return Built(model, lambda s: tokens(s, labels))

    return make


def _decoder(cls_name: str, cfg_name: str, **kw: object) -> Callable[[], Built]:
    return _text(cls_name, cfg_name, "lm", **{**DECODER, **kw})


def _seq2seq(cls_name: str, cfg_name: str, **kw: object) -> Callable[[], Built]:
    def make() -> Built:
        import transformers

        cfg = getattr(transformers, cfg_name)(**{**SEQ2SEQ, **kw})
        return Built(getattr(transformers, cls_name)(cfg), seq2seq)

    return make


def _speech(cls_name: str, cfg_name: str, **kw: object) -> Callable[[], Built]:
    def make() -> Built:
        import transformers

        cfg = getattr(transformers, cfg_name)(**{**SPEECH, **kw})
        return Built(getattr(transformers, cls_name)(cfg), audio)

    return make


def _vision(cls_name: str, cfg_name: str, **kw: object) -> Callable[[], Built]:
    def make() -> Built:
        import transformers

        cfg = getattr(transformers, cfg_name)(num_labels=3, **kw)
        return Built(getattr(transformers, cls_name)(cfg), images)

    return make


def _t5() -> Built:
    import transformers

    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0
    )
    return Built(transformers.T5ForConditionalGeneration(cfg), seq2seq)


def _switch() -> Built:
    import transformers

    cfg = transformers.SwitchTransformersConfig(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        expert_capacity=8,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        num_heads=2,
        num_experts=4,
        decoder_start_token_id=0,
    )
    return Built(transformers.SwitchTransformersForConditionalGeneration(cfg), seq2seq)


def _whisper() -> Built:
    import transformers

    cfg = transformers.WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )

    def batch(step: int) -> Batch:
        g = _gen(step)
        return {
            "input_features": torch.randn(B, 16, 32, generator=g),
            "labels": torch.randint(3, VOCAB, (B, T), generator=g),
        }

    return Built(transformers.WhisperForConditionalGeneration(cfg), batch)


def _clip() -> Built:
    import transformers

    cfg = transformers.CLIPConfig(
        text_config={**TEXT, "max_position_embeddings": 16, "projection_dim": 16},
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": IMAGE,
            "patch_size": 8,
            "projection_dim": 16,
        },
        projection_dim=16,
    )

    def batch(step: int) -> Batch:
        b = images(step)
        t = tokens(step, labels="none")
        return {"input_ids": t["input_ids"], "pixel_values": b["pixel_values"], "return_loss": True}

    return Built(transformers.CLIPModel(cfg), batch)


def _reformer() -> Built:
    import transformers

    cfg = transformers.ReformerConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        attn_layers=["local", "lsh"],
        feed_forward_size=64,
        axial_pos_shape=(2, 4),
        axial_pos_embds_dim=(16, 16),
        max_position_embeddings=T,
        local_attn_chunk_length=4,
        lsh_attn_chunk_length=4,
        num_buckets=2,
        is_decoder=True,
        pad_token_id=0,
        eos_token_id=2,
        # Reformer's reversible layers reseed dropout with `torch.seed()` (not reproducible): no dropout, so that
        # runs with and without the guard, and the perturbation test, see the same numbers.
        hidden_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
    )
    return Built(transformers.ReformerModelWithLMHead(cfg), tokens)


VISION_SMALL = {"num_channels": 3}

ARCHS: list[Arch] = [
    # encoders
    Arch("bert-cls", "encoder", _text("BertForSequenceClassification", "BertConfig", "cls")),
    Arch("bert-mlm", "encoder", _text("BertForMaskedLM", "BertConfig")),
    Arch("roberta", "encoder", _text("RobertaForSequenceClassification", "RobertaConfig", "cls", pad_token_id=0)),
    Arch("deberta-v2", "encoder", _text("DebertaV2ForSequenceClassification", "DebertaV2Config", "cls")),
    Arch("albert", "encoder", _text("AlbertForMaskedLM", "AlbertConfig", embedding_size=16)),
    Arch("electra", "encoder", _text("ElectraForSequenceClassification", "ElectraConfig", "cls", embedding_size=16)),
    Arch(
        "xlnet",
        "encoder",
        _text("XLNetLMHeadModel", "XLNetConfig", omit=("max_position_embeddings",), d_inner=64, d_head=16),
    ),
    Arch(
        "funnel",
        "encoder",
        _text(
            "FunnelForSequenceClassification",
            "FunnelConfig",
            "cls",
            block_sizes=[1, 1],
            omit=("num_hidden_layers",),
            d_model=32,
            n_head=2,
            d_head=16,
            d_inner=64,
        ),
    ),
    Arch(
        "longformer",
        "encoder",
        _text("LongformerForSequenceClassification", "LongformerConfig", "cls", attention_window=4, pad_token_id=0),
    ),
    Arch(
        "bigbird",
        "encoder",
        _text("BigBirdForSequenceClassification", "BigBirdConfig", "cls", attention_type="original_full"),
    ),
    Arch("reformer", "encoder", _reformer),
    Arch(
        "distilbert",
        "encoder",
        _text(
            "DistilBertForSequenceClassification",
            "DistilBertConfig",
            "cls",
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
        ),
    ),
    Arch("roformer", "encoder", _text("RoFormerForMaskedLM", "RoFormerConfig")),
    # decoders
    Arch("gpt2", "decoder", _decoder("GPT2LMHeadModel", "GPT2Config")),
    Arch(
        "gpt-neo",
        "decoder",
        _decoder("GPTNeoForCausalLM", "GPTNeoConfig", attention_types=[[["global", "local"], 1]], window_size=4),
    ),
    Arch("opt", "decoder", _decoder("OPTForCausalLM", "OPTConfig", ffn_dim=64, word_embed_proj_dim=32)),
    Arch("llama", "decoder", _decoder("LlamaForCausalLM", "LlamaConfig")),
    Arch("mistral", "decoder", _decoder("MistralForCausalLM", "MistralConfig")),
    Arch("qwen2", "decoder", _decoder("Qwen2ForCausalLM", "Qwen2Config")),
    Arch("phi", "decoder", _decoder("PhiForCausalLM", "PhiConfig")),
    Arch("gemma", "decoder", _decoder("GemmaForCausalLM", "GemmaConfig")),
    Arch("gpt-neox", "decoder", _decoder("GPTNeoXForCausalLM", "GPTNeoXConfig")),
    Arch("bloom", "decoder", _decoder("BloomForCausalLM", "BloomConfig", n_head=2)),
    # encoder-decoders
    Arch("t5", "seq2seq", _t5),
    Arch("bart", "seq2seq", _seq2seq("BartForConditionalGeneration", "BartConfig")),
    Arch("pegasus", "seq2seq", _seq2seq("PegasusForConditionalGeneration", "PegasusConfig")),
    Arch("marian", "seq2seq", _seq2seq("MarianMTModel", "MarianConfig", decoder_vocab_size=VOCAB)),
    Arch("whisper", "seq2seq", _whisper),
    # mixture of experts
    Arch("switch", "moe", _switch),
    Arch("mixtral", "moe", _decoder("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2)),
    Arch(
        "qwen2-moe",
        "moe",
        _decoder(
            "Qwen2MoeForCausalLM",
            "Qwen2MoeConfig",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
    ),
    Arch("olmoe", "moe", _decoder("OlmoeForCausalLM", "OlmoeConfig", num_experts=4, num_experts_per_tok=2)),
    # speech (LayerDrop 0.1 by default)
    Arch("wav2vec2", "speech", _speech("Wav2Vec2ForCTC", "Wav2Vec2Config")),
    Arch("hubert", "speech", _speech("HubertForCTC", "HubertConfig")),
    Arch(
        "wavlm",
        "speech",
        _speech("WavLMForCTC", "WavLMConfig"),
        broken=(("ckpt-reentrant", "backward recurses through nested reentrant checkpoints until memory runs out"),),
    ),
    # vision
    Arch(
        "vit",
        "vision",
        _vision(
            "ViTForImageClassification",
            "ViTConfig",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=IMAGE,
            patch_size=8,
        ),
    ),
    Arch(
        "dinov2",
        "vision",
        _vision(
            "Dinov2ForImageClassification",
            "Dinov2Config",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            image_size=IMAGE,
            patch_size=8,
        ),
    ),
    Arch(
        "swin",
        "vision",
        _vision(
            "SwinForImageClassification",
            "SwinConfig",
            image_size=IMAGE,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
            drop_path_rate=0.1,
        ),
    ),
    Arch(
        "convnext",
        "vision",
        _vision(
            "ConvNextForImageClassification",
            "ConvNextConfig",
            hidden_sizes=[16, 32],
            depths=[1, 1],
            num_stages=2,
            drop_path_rate=0.5,
        ),
    ),
    Arch(
        "mobilenet-v2",
        "vision",
        _vision("MobileNetV2ForImageClassification", "MobileNetV2Config", depth_multiplier=0.25, image_size=IMAGE),
    ),
    Arch(
        "mobilevit",
        "vision",
        _vision(
            "MobileViTForImageClassification",
            "MobileViTConfig",
            image_size=IMAGE,
            patch_size=2,
            hidden_sizes=[16, 24, 32],
            neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
            num_attention_heads=2,
        ),
    ),
    Arch(
        "efficientnet",
        "vision",
        _vision(
            "EfficientNetForImageClassification",
            "EfficientNetConfig",
            image_size=IMAGE,
            width_coefficient=0.1,
            depth_coefficient=0.1,
            hidden_dim=128,
        ),
    ),
    Arch(
        "resnet",
        "vision",
        _vision("ResNetForImageClassification", "ResNetConfig", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
    ),
    Arch(
        "deit",
        "vision",
        _vision(
            "DeiTForImageClassification",
            "DeiTConfig",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=IMAGE,
            patch_size=8,
        ),
    ),
    Arch("clip", "multimodal", _clip),
]


def build(arch: Arch, seed: int = 0) -> Built:
    """Build ``arch`` with every random draw of the build seeded by ``seed``; quiet about config warnings."""
    torch.manual_seed(seed)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return arch.make()
