"""Your class back for the causal LMs users bring (issue 30, item 3): grouped-query, multi-query,
constant-multiplier, parallel-block and untied-head families, coalesced 0.5/0.5 and grown 2/2,
saved with ``--format hf`` and loaded by their own ``from_pretrained``: the outputs equal the
level's within 1e-5. Where no configuration of the class computes the level (Gemma scales its
embeddings by sqrt(hidden_size), a constant the level keeps), the CLI refuses before writing
anything and names the nearest factors whose level it can write."""

from __future__ import annotations

import pytest
import torch

import vcyclefx as vf
from tests.conftest import other_inputs, output_tensor, rel_error
from vcyclefx import zoo
from vcyclefx.cli import main as cli_main
from vcyclefx.export.leveldir import load_level

V = 128
SMALL = dict(vocab_size=V, use_cache=False, max_position_embeddings=64)
GQA = dict(SMALL, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, intermediate_size=128)


def _family(name):
    """(model, example inputs, the config fields expected after coalesce(0.5, 0.5), after
    decoalesce(2, 2)). Key/value heads at 2 cannot be halved (a space keeps >= 2 units), so a
    coalesced grouped-query level keeps its heads of 16 and the class gets ``head_dim=16``."""
    T = zoo._hf_quiet()
    torch.manual_seed(0)
    gqa_down = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=64, num_hidden_layers=1)
    gqa_up = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=256, num_hidden_layers=4)
    if name == "olmo":  # grouped-query, head_dim derived unless written
        return T.OlmoForCausalLM(T.OlmoConfig(**GQA)), gqa_down, gqa_up
    if name == "granite":  # constant multipliers (embedding, residual, attention, logits)
        cfg = T.GraniteConfig(**GQA, embedding_multiplier=12.0, residual_multiplier=0.22,
                              attention_multiplier=0.0078125, logits_scaling=8.0)
        return T.GraniteForCausalLM(cfg), gqa_down, gqa_up
    if name == "cohere":  # parallel block, logit scale, tied head folded behind a dtype cast
        cfg = T.CohereConfig(**GQA, logit_scale=0.25)
        return T.CohereForCausalLM(cfg), gqa_down, gqa_up
    if name == "starcoder2":  # grouped-query with biases
        return T.Starcoder2ForCausalLM(T.Starcoder2Config(**GQA)), gqa_down, gqa_up
    if name == "gpt-bigcode":  # multi-query, fused c_attn (q of n_embd + one k and v head)
        cfg = T.GPTBigCodeConfig(vocab_size=V, use_cache=False, n_embd=64, n_layer=2, n_head=4,
                                 n_positions=64, multi_query=True)
        return (T.GPTBigCodeForCausalLM(cfg), dict(n_embd=32, n_head=2, n_layer=1),
                dict(n_embd=128, n_head=8, n_layer=4))
    if name == "falcon":  # multi-query and parallel attention/MLP
        cfg = T.FalconConfig(**SMALL, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             multi_query=True, parallel_attn=True,
                             new_decoder_architecture=False, bias=False, alibi=False)
        return (T.FalconForCausalLM(cfg),
                dict(hidden_size=32, num_attention_heads=2, ffn_hidden_size=128,
                     num_hidden_layers=1),
                dict(hidden_size=128, num_attention_heads=8, ffn_hidden_size=512,
                     num_hidden_layers=4))
    if name == "llama-mqa":  # multi-query through repeat_kv
        cfg = T.LlamaConfig(**dict(GQA, num_key_value_heads=1))
        return (T.LlamaForCausalLM(cfg),
                dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                     num_hidden_layers=1),
                dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=1,
                     num_hidden_layers=4))
    if name == "gpt-neox":  # parallel residual, untied head, partial rotary
        cfg = T.GPTNeoXConfig(**SMALL, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=128,
                              tie_word_embeddings=False)
        return (T.GPTNeoXForCausalLM(cfg),
                dict(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     num_hidden_layers=1),
                dict(hidden_size=128, num_attention_heads=8, intermediate_size=256,
                     num_hidden_layers=4))
    if name == "gptj":  # parallel block, untied head with a bias
        cfg = T.GPTJConfig(vocab_size=V, use_cache=False, n_embd=64, n_layer=2, n_head=4,
                           rotary_dim=8, n_positions=64)
        return (T.GPTJForCausalLM(cfg), dict(n_embd=32, n_head=2, n_layer=1),
                dict(n_embd=128, n_head=8, n_layer=4))
    raise KeyError(name)


# one family of each kind runs by default (grouped-query head_dim, multi-query heads, a parallel
# block with constant scales); the rest with -m slow
DEFAULT = {("olmo", "coalesce"), ("gpt-bigcode", "decoalesce")}
FAMILIES = ["olmo", "granite", "cohere", "starcoder2", "gpt-bigcode", "falcon", "llama-mqa",
            "gpt-neox", "gptj"]


@pytest.mark.parametrize("name,direction", [
    pytest.param(n, d, id=f"{n}-{d}", marks=() if (n, d) in DEFAULT else pytest.mark.slow)
    for n in FAMILIES for d in ("coalesce", "decoalesce")])
def test_format_hf_round_trips_through_from_pretrained(name, direction, tmp_path):
    model, down, up = _family(name)
    x = (zoo._tokens(V),)
    src = tmp_path / "src"
    model.save_pretrained(src)
    out = tmp_path / "out"
    args = (["coalesce", str(src), "--width", "0.5", "--depth", "0.5"] if direction == "coalesce"
            else ["decoalesce", str(src), "--width", "2", "--depth", "2"])
    assert cli_main([*args, "--format", "hf", "-o", str(out)]) == 0
    level, _ = load_level(out)
    back = type(model).from_pretrained(out)  # the level files are beside the HF ones
    expected = down if direction == "coalesce" else up
    assert {k: getattr(back.config, k) for k in expected} == expected
    y = other_inputs(x)
    back.eval(), level.eval()
    with torch.no_grad():
        assert rel_error(output_tensor(back(*y)), output_tensor(level(*y))) <= 1e-5


def test_a_class_that_cannot_express_the_level_is_refused_with_the_nearest_factors(tmp_path,
                                                                                   capsys):
    T = zoo._hf_quiet()
    torch.manual_seed(0)
    cfg = T.GemmaConfig(**GQA, head_dim=16)
    src, out = tmp_path / "gemma", tmp_path / "out"
    T.GemmaForCausalLM(cfg).save_pretrained(src)
    code = cli_main(["coalesce", str(src), "--width", "0.5", "--depth", "0.5", "--format", "hf",
                     "-o", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()  # nothing written
    assert "no configuration of transformers.models.gemma.modeling_gemma.GemmaForCausalLM " \
           "computes this level's function" in err
    # sqrt(hidden_size) scales the embeddings: any width change is inexpressible, depth is not
    assert "nearest factors whose level --format hf can write: --width 1 --depth 0.5" in err
