"""The model zoo used by tests and benchmarks.

Small configurations of real model families with random weights; nothing is downloaded.
Every entry is a callable returning ``(model, example_inputs)`` and can be named on the
command line as ``vcyclefx.zoo:NAME`` (e.g. ``vcyclefx inspect vcyclefx.zoo:gpt2``).

``FRONTEND`` says which capture front-end an entry is meant for (default: torch.export).
"""

from __future__ import annotations

import torch

from vcyclefx.zoo.gpt import GPT, GPTConfig

SEQ = 16
BATCH = 2
IMG = 32


def _tokens(vocab: int, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _image(batch: int = BATCH, size: int = IMG) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=g)


def _hf_quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def gpt2(n_layer: int = 2, n_head: int = 4, n_embd: int = 64, vocab: int = 128):
    """Hugging Face GPT-2: tied embedding/LM head, fused ``c_attn`` (Conv1D), pre-norm."""
    T = _hf_quiet()
    torch.manual_seed(0)
    cfg = T.GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=64,
        use_cache=False, bos_token_id=0, eos_token_id=0,
    )
    return T.GPT2LMHeadModel(cfg), (_tokens(vocab),)


def gpt2_base():
    """The 124M GPT-2 (12 layers, 12 heads, 768 wide) on the meta device, for benchmarks."""
    T = _hf_quiet()
    cfg = T.GPT2Config(use_cache=False)
    with torch.device("meta"):
        model = T.GPT2LMHeadModel(cfg)
    return model, (_tokens(cfg.vocab_size),)


def gpt2_base_real():
    """The 124M GPT-2 with real (random) weights on the CPU."""
    T = _hf_quiet()
    torch.manual_seed(0)
    cfg = T.GPT2Config(use_cache=False)
    return T.GPT2LMHeadModel(cfg), (_tokens(cfg.vocab_size),)


def bert(n_layer: int = 2, n_head: int = 4, hidden: int = 64, vocab: int = 128):
    """Hugging Face BERT masked LM: post-norm, token types, decoder tied to the embedding."""
    T = _hf_quiet()
    torch.manual_seed(0)
    cfg = T.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layer,
        num_attention_heads=n_head, intermediate_size=2 * hidden, max_position_embeddings=64,
    )
    ids = _tokens(vocab)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    types[:, SEQ // 2 :] = 1
    return T.BertForMaskedLM(cfg), (ids, mask, types)


def llama(n_layer: int = 2, n_head: int = 8, n_kv: int = 4, hidden: int = 64, vocab: int = 128):
    """Hugging Face LLaMA: grouped-query attention, rotary embeddings, RMSNorm, SwiGLU."""
    T = _hf_quiet()
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv, intermediate_size=2 * hidden,
        max_position_embeddings=64, use_cache=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )
    return T.LlamaForCausalLM(cfg), (_tokens(vocab),)


def deit(depth: int = 2):
    """timm DeiT-tiny (192 wide, 3 heads) at 32x32 with 8x8 patches: conv patch embedding,
    cls token, position embedding, fused ``qkv`` reshaped to (3, H, Dh)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=8, depth=depth,
        num_classes=10,
    )
    return model, (_image(),)


def vit(n_layer: int = 2, n_head: int = 4, hidden: int = 64):
    """torchvision VisionTransformer: nn.MultiheadAttention (packed in_proj, batch*heads views)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=IMG, patch_size=8, num_layers=n_layer, num_heads=n_head, hidden_dim=hidden,
        mlp_dim=2 * hidden, num_classes=10,
    )
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits the head
    return model, (_image(),)


def resnet18():
    """torchvision ResNet-18: convolutions, BatchNorm (running statistics), residual adds."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10), (_image(),)


def nanogpt(n_layer: int = 2, n_head: int = 4, n_embd: int = 64, vocab: int = 128):
    """The repository's own nanoGPT-style module (tied head), captured with symbolic_trace."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    return GPT(cfg), (_tokens(vocab),)


ZOO = {
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
    "deit": deit,
    "vit": vit,
    "resnet18": resnet18,
    "nanogpt": nanogpt,
}

FRONTEND = {"nanogpt": "fx"}
