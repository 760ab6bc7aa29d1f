"""Your model back at its new size: vf.to_module gives the original class at a level's sizes
(config updated), loaded strictly, computing the level's function; also through
save_pretrained/from_pretrained, the CLI's --format hf/module and every MODEL form."""

from __future__ import annotations

import json

import pytest
import torch

import vcyclefx as vf
from tests.conftest import other_inputs, output_tensor, rel_error
from vcyclefx import zoo
from vcyclefx.capture.specs import model_from_spec


def _hf(name):
    T = zoo._hf_quiet()
    torch.manual_seed(0)
    if name == "qwen2":
        cfg = T.Qwen2Config(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=4, intermediate_size=128,
                            max_position_embeddings=64, use_cache=False)
        return T.Qwen2ForCausalLM(cfg), (zoo._tokens(128),)
    cfg = T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=128, num_labels=10)
    return T.ViTForImageClassification(cfg), (zoo._image(),)


# name -> (build, config fields expected after coalesce(0.5, 0.5), after decoalesce(2, 2))
HF_CASES = {
    "gpt2": (zoo.gpt2, dict(n_embd=32, n_head=2, n_layer=1), dict(n_embd=128, n_head=8, n_layer=4)),
    "llama": (zoo.llama, dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, num_hidden_layers=1, head_dim=8),
              dict(hidden_size=128, num_attention_heads=16, num_key_value_heads=8,
                   intermediate_size=256, num_hidden_layers=4, head_dim=8)),
    "bert": (zoo.bert, dict(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                            num_hidden_layers=1),
             dict(hidden_size=128, num_attention_heads=8, intermediate_size=256,
                  num_hidden_layers=4)),
    "qwen2": (lambda: _hf("qwen2"), dict(hidden_size=32, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64,
                                          num_hidden_layers=1),
              dict(hidden_size=128, num_attention_heads=16, num_key_value_heads=8,
                   intermediate_size=256, num_hidden_layers=4)),
    "hf-vit": (lambda: _hf("vit"), dict(hidden_size=32, num_attention_heads=2,
                                         intermediate_size=64, num_hidden_layers=1),
               dict(hidden_size=128, num_attention_heads=8, intermediate_size=256,
                    num_hidden_layers=4)),
}


def _same_function(module, level, x) -> float:
    module.eval(), level.eval()
    with torch.no_grad():
        return rel_error(output_tensor(module(*x)), output_tensor(level(*x)))


@pytest.mark.parametrize("name,direction", [
    pytest.param(n, d, id=f"{n}-{d}", marks=pytest.mark.slow if (n, d) == ("qwen2", "decoalesce") else ())
    for n in HF_CASES for d in ("coalesce", "decoalesce")])
def test_hugging_face_levels_come_back_as_their_class_with_the_config_sizes(name, direction,
                                                                             tmp_path):
    build, down, up = HF_CASES[name]
    model, example = build()
    if direction == "coalesce":
        level, _ = vf.coalesce(model, example, width=0.5, depth=0.5)
    else:
        level, _ = vf.decoalesce(model, example, width=2.0, depth=2.0)
    mine = vf.to_module(level)
    assert type(mine) is type(model)
    expected = down if direction == "coalesce" else up
    assert {k: getattr(mine.config, k) for k in expected} == expected
    x = other_inputs(example) if name != "bert" else example  # BERT: mask/type ids as given
    assert _same_function(mine, level, x) <= 1e-6
    fresh = type(model)(mine.config)  # the config alone builds the same shapes: strict load
    fresh.load_state_dict(level.state_dict(), strict=True)
    mine.save_pretrained(tmp_path / "m")
    back = type(model).from_pretrained(tmp_path / "m")
    assert _same_function(back, level, x) <= 1e-6


LIB_CASES = {
    "timm-deit": ("timm:deit_tiny_patch16_224?img_size=32&patch_size=8&depth=2&num_classes=10"
                  "&embed_dim=128&num_heads=4",
                  dict(embed_dim=64, num_heads=2, depth=1), dict(embed_dim=256, num_heads=8, depth=4)),
    "timm-convnext": ("timm:convnext_atto?num_classes=10&dims=(16,32,64,128)&depths=(2,2,2,2)",
                      dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
                      dict(dims=[32, 64, 128, 256], depths=[4, 4, 4, 4])),
    "torchvision-vit": ("torchvision:vit_b_16?image_size=32&patch_size=8&num_layers=2&num_heads=4"
                        "&hidden_dim=64&mlp_dim=128&num_classes=10",
                        dict(hidden_dim=32, mlp_dim=64, num_layers=1),
                        dict(hidden_dim=128, mlp_dim=256, num_layers=4)),
}


@pytest.mark.parametrize("name,direction", [  # convnext grown x2 in width and depth: -m slow
    pytest.param(n, d, id=f"{n}-{d}",
                 marks=pytest.mark.slow if (n, d) == ("timm-convnext", "decoalesce") else ())
    for n in LIB_CASES for d in ("coalesce", "decoalesce")])
def test_timm_and_torchvision_levels_come_back_as_their_class_with_the_new_arguments(name,
                                                                                      direction):
    from vcyclefx.export.module import module_call

    spec, down, up = LIB_CASES[name]
    found = model_from_spec(spec, batch=1)
    fn, kw = ((vf.coalesce, dict(width=0.5, depth=0.5)) if direction == "coalesce"
              else (vf.decoalesce, dict(width=2.0, depth=2.0)))
    level, _ = fn(found.model, found.example, recipe=found.recipe, **kw)
    mine = vf.to_module(level)
    assert type(mine) is type(found.model)
    assert _same_function(mine, level, found.example) <= 1e-6
    call = module_call(level)
    expected = down if direction == "coalesce" else up
    assert {k: call["kwargs"][k] for k in expected} == expected


def test_a_level_no_configuration_can_express_is_refused_naming_the_tensor():
    # timm's ViT derives head_dim = embed_dim // num_heads: 3 heads cannot be halved evenly,
    # so the coalesced level keeps heads of the old size, which no argument expresses
    found = model_from_spec("timm:deit_tiny_patch16_224?img_size=32&patch_size=8&depth=2"
                            "&num_classes=10", batch=1)
    level, _ = vf.coalesce(found.model, found.example, width=0.5, depth=0.5, recipe=found.recipe)
    with pytest.raises(vf.LevelError, match=r"no configuration of timm\.models\.vision_transformer"
                                            r"\.VisionTransformer reproduces this level: tensor "
                                            r"blocks\.0\.attn\.\w+\.\w+ has shape"):
        vf.to_module(level)


def _explicit_head_dim(name):
    """A grouped-query causal LM whose config sets ``head_dim`` (4 query heads, 2 key/value
    heads of 16, hidden 64)."""
    T = zoo._hf_quiet()
    torch.manual_seed(0)
    sizes = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128,
                 max_position_embeddings=64, use_cache=False)
    if name == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(**sizes)), (zoo._tokens(128),)
    return T.GemmaForCausalLM(T.GemmaConfig(**sizes)), (zoo._tokens(128),)


@pytest.mark.parametrize("name", ["qwen3", pytest.param("gemma", marks=pytest.mark.slow)])
def test_a_grouped_query_lm_with_an_explicit_head_dim_comes_back_or_is_refused_leaving_torch_state(
        name):
    # Qwen3's config validates layer_types against num_hidden_layers, so some meta builds of the
    # search fail: each one used to leave the meta device and a function mode on the stack, and
    # the check's forward then ran on meta (RuntimeError: Tensor.item() ... meta tensors)
    model, example = _explicit_head_dim(name)
    level, _ = vf.coalesce(model, example, width=0.5, depth=0.5)
    if name == "qwen3":
        mine = vf.to_module(level)
        assert type(mine) is type(model)
        assert {k: getattr(mine.config, k) for k in ("hidden_size", "num_attention_heads",
                                                      "num_key_value_heads", "head_dim",
                                                      "intermediate_size", "num_hidden_layers")} \
            == dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=64, num_hidden_layers=1)
        assert _same_function(mine, level, other_inputs(example)) <= 1e-5
    else:
        # Gemma scales its embeddings by sqrt(hidden_size): the level keeps sqrt(64), the class
        # at hidden_size=32 computes sqrt(32), so no configuration has the level's function
        with pytest.raises(vf.LevelError, match=r"no configuration of \S+GemmaForCausalLM "
                                                r"computes this level's function: with "
                                                r"hidden_size=32.* outputs differ"):
            vf.to_module(level)
    assert torch.get_default_device() == torch.device("cpu")
    assert torch.overrides._get_current_function_mode_stack() == []


class FixedHeads(torch.nn.Module):
    """A block whose forward writes its head shape as constants (4 heads of 16): no constructor
    argument controls it."""

    def __init__(self, dim: int = 16, inner: int = 64):
        super().__init__()
        self.a, self.b = torch.nn.Linear(dim, inner), torch.nn.Linear(inner, dim)

    def forward(self, x):
        B, T, _ = x.shape
        h = self.a(x).view(B, T, 4, 16).softmax(-1).reshape(B, T, -1)  # (B, T, 4, 16)
        return self.b(h)


def test_a_class_whose_forward_refuses_the_level_sizes_is_a_level_error_naming_the_failure():
    from vcyclefx.capture.recipe import CALL, Recipe, qualname

    torch.manual_seed(0)
    level, _ = vf.coalesce(FixedHeads(), (torch.randn(2, 5, 16),), width=0.5,
                           recipe=Recipe(CALL, qualname(FixedHeads), {}))
    # inner=32 gives every tensor the level's shape, but view(B, T, 4, 16) of 32 features fails
    with pytest.raises(vf.LevelError, match=r"with inner=32 every tensor has the level's shape "
                                            r"but its forward fails on the level's example "
                                            r"inputs \(RuntimeError: shape '\[2, 5, 4, 16\]' is "
                                            r"invalid"):
        vf.to_module(level)
    assert torch.get_default_device() == torch.device("cpu")


def test_a_level_of_a_model_without_a_recipe_says_how_to_give_one():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    level, _ = vf.coalesce(Net(), (torch.randn(2, 8),), width=0.5)
    with pytest.raises(vf.LevelError, match="does not know how its original model .* is built"):
        vf.to_module(level)


def test_cli_writes_a_hugging_face_directory_that_from_pretrained_loads(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from vcyclefx.cli import main

    model, example = zoo.llama()
    model.save_pretrained(tmp_path / "my-llama")
    assert main(["coalesce", str(tmp_path / "my-llama"), "--width", "0.5", "--depth", "0.5",
                 "-o", str(tmp_path / "small"), "--format", "hf", "--seq", "12"]) == 0
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert (small.config.hidden_size, small.config.num_key_value_heads,
            small.config.num_hidden_layers) == (32, 2, 1)
    from vcyclefx.export.leveldir import load_level

    level, _ = load_level(tmp_path / "small")  # the level files are beside the HF ones
    assert level.info.example_inputs[0].shape == (2, 12)
    assert _same_function(small, level, other_inputs(example)) <= 1e-6
    assert main(["decoalesce", str(tmp_path / "small"), "-o", str(tmp_path / "big"),
                 "--format", "hf"]) == 0
    big = AutoModelForCausalLM.from_pretrained(tmp_path / "big")
    assert big.config.hidden_size == 64 and big.config.num_hidden_layers == 2
    # --format hf of a model that is not a Hugging Face one is refused before anything is written
    assert main(["coalesce", "vcyclefx.zoo:nanogpt", "-o", str(tmp_path / "x"), "--format", "hf"]) == 2
    assert "needs a Hugging Face model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_candidates_hold_the_level_weights_and_to_module_still_owns_copies_with_ties_kept():
    """Solving builds each candidate with meta parameters and gives it the level's (float32)
    tensors, not copies: no second full-size model per candidate (a streamed `decoalesce
    --format hf` of a 2.43 GB bf16 level peaked at 12.2 GiB, now 7.8 GiB). `to_module` still
    returns a module with its own tensors, and the head tied to the embedding stays one
    parameter; for a bf16 level the module holds float32 copies."""
    from vcyclefx.export.module import solve

    model, example = zoo.gpt2()  # ties lm_head.weight to transformer.wte.weight
    level, _ = vf.coalesce(model, example, width=0.5, depth=0.5)
    state = level.state_dict()
    _, _, shared, _ = solve(level, own=False)
    for name, t in shared.state_dict().items():
        assert t.data_ptr() == state[name].data_ptr(), name
    own = vf.to_module(level)
    ptrs = {t.data_ptr() for t in state.values()}
    assert not any(t.data_ptr() in ptrs for t in own.state_dict().values())
    assert own.lm_head.weight is own.transformer.wte.weight
    assert _same_function(own, level, other_inputs(example)) <= 1e-6
    low = vf.to_module(level.to(torch.bfloat16))
    assert {p.dtype for p in low.parameters()} == {torch.float32}
    assert low.lm_head.weight is low.transformer.wte.weight
    assert all(torch.equal(low.state_dict()[n], t.float()) for n, t in level.state_dict().items())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_bf16_level_is_verified_in_float32_through_views_of_its_own_weights(name, monkeypatch):
    """A bf16 level is compared in float32 without a float32 copy: its weights are lent as
    Float32Views (each upcast for the op that reads it), which compute exactly what the float32
    copy computes, and give the same configuration; where the level's graph cannot run on the
    views, the float32 copy is used. `solve(own=False)` returns the level's own bf16 tensors."""
    from vcyclefx.export import module as M

    build = {"llama": zoo.llama, "gpt2": zoo.gpt2}[name]
    model, example = build()
    level, _ = vf.coalesce(model.to(torch.bfloat16), example, width=0.5, depth=0.5, check=False)
    level.eval()
    state = level.state_dict()
    view = M.float32_view(level)
    lent = view.state_dict()
    assert all(isinstance(lent[n], M.Float32View) and
               lent[n].inner.data_ptr() == t.data_ptr() for n, t in state.items()
               if t.dtype == torch.bfloat16)
    with torch.no_grad():
        a = M._leaves(view(*level.info.example_inputs))
        b = M._leaves(M.float32_level(level)(*level.info.example_inputs))
    assert [x.dtype for x in a] == [torch.float32] * len(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    _, overrides, module, err = M.solve(level, own=False)
    assert err <= M.TOLERANCE
    assert all(t.dtype == torch.bfloat16 and t.data_ptr() == state[n].data_ptr()
               for n, t in module.state_dict().items())
    # the same answer with the float32 copy, and when the views cannot run the level's graph
    with monkeypatch.context() as m:
        m.setattr(M, "float32_view", M.float32_level)
        assert M.solve(level)[1] == overrides

    def refuse(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("no views here")

    monkeypatch.setattr(M.Float32View, "__torch_dispatch__", classmethod(refuse))
    _, again, module, err = M.solve(level)
    assert again == overrides and err <= M.TOLERANCE
    assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_a_bf16_vision_level_with_bf16_inputs_comes_back_as_its_class():
    """A bf16 image model's example input is bf16 too: the float32 comparison upcasts it with
    the weights (it used to fail inside the solve, "Input type (BFloat16) and bias type (float)
    should be the same", whichever way the weights were upcast)."""
    found = model_from_spec("timm:convnext_atto")
    image = torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)
    level, _ = vf.coalesce(found.model.to(torch.bfloat16), (image,), width=0.5, check=False,
                           recipe=found.recipe)
    mine = vf.to_module(level)
    assert (mine.stem[0].out_channels, mine.head.fc.in_features) == (20, 160)  # dims halved
    x = torch.randn_like(image, dtype=torch.float32)
    mine.eval(), level.eval()
    with torch.no_grad():
        assert rel_error(output_tensor(mine(x)), output_tensor(level(x.to(torch.bfloat16)))) < 0.05


def test_cli_format_module_writes_the_call_that_builds_the_class_at_the_new_sizes(tmp_path):
    from vcyclefx.cli import main
    from vcyclefx.export.formats import load_module
    from vcyclefx.export.leveldir import load_level

    out = tmp_path / "small"
    spec = LIB_CASES["torchvision-vit"][0]
    assert main(["coalesce", spec, "--width", "0.5", "--depth", "0.5", "-o", str(out),
                 "--format", "module"]) == 0
    desc = json.loads((out / "module.json").read_text())
    assert desc["call"] == "torchvision.models.vision_transformer.VisionTransformer"
    assert desc["kwargs"]["hidden_dim"] == 32 and desc["kwargs"]["num_layers"] == 1
    module = load_module(out)
    level, _ = load_level(out)
    assert _same_function(module, level, level.info.example_inputs) <= 1e-6


def test_factory_models_with_keyword_overrides_round_trip_through_their_factory():
    found = model_from_spec("vcyclefx.zoo:nanogpt?n_layer=4")
    assert len(found.model.blocks if hasattr(found.model, "blocks") else found.model.h) == 4
    level, _ = vf.coalesce(found.model, found.example, width=0.5, depth=0.5,
                           recipe=found.recipe, frontend="fx")
    mine = vf.to_module(level)
    assert type(mine) is type(found.model)
    assert _same_function(mine, level, found.example) <= 1e-6


@pytest.mark.slow  # the Trainer's V-cycle is tests/test_integrations_hf.py's, by default
def test_a_vcycle_trained_stage_by_stage_with_the_hugging_face_trainer_ends_in_a_loadable_model(
        tmp_path):
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

    model, example = zoo.gpt2(n_layer=4)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (64, 16), generator=g)]
    cycle = vf.VCycle(model, example, levels=2, width=0.5, depth=0.5, alpha=0.25, steps=[3, 4, 3])
    seen = []
    for stage in cycle:
        mine = stage.module()  # a GPT2LMHeadModel at this level's sizes, sharing the level's tensors
        assert isinstance(mine, GPT2LMHeadModel) and mine is stage.module()
        before = {k: v.clone() for k, v in stage.model.state_dict().items()}
        args = TrainingArguments(output_dir=str(tmp_path / f"stage{stage.index}"),
                                 max_steps=stage.steps, per_device_train_batch_size=8,
                                 learning_rate=1e-3 * stage.lr_scale, report_to=[],
                                 save_strategy="no", logging_strategy="no", use_cpu=True,
                                 dataloader_num_workers=0, seed=stage.index)
        Trainer(model=mine, args=args, train_dataset=data).train()
        changed = [k for k, v in stage.model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed  # what the Trainer learned is in the level the next transition maps
        seen.append((stage.level, mine.config.n_embd, mine.config.n_layer))
    assert seen == [(0, 64, 4), (1, 32, 2), (0, 64, 4)]
    final = cycle.result(as_module=True)
    final.save_pretrained(tmp_path / "final")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "final")
    x = other_inputs(example)
    assert _same_function(back, cycle.result(), x) <= 1e-6
