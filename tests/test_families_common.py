"""transformers' model conventions, checked for every catalogue variant's tiny preset x every auto class of its
family (as transformers' ModelTester and timm's `list_models` loops do)."""

import math
import warnings

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from hub.catalogue import VARIANTS
from hub.models import get_family

# Heads that take several seconds a test on 2 CPU cores (FCOS; MACL's two-branch views).
SLOW_HEADS = {
    ("umedpt", "AutoModelForObjectDetection"),
    ("macl", "AutoModelForPreTraining"),
}
CASES = [
    pytest.param(
        variant.id,
        auto_name,
        id=f"{variant.id}-{auto_name}",
        marks=[pytest.mark.slow] if (variant.family, auto_name) in SLOW_HEADS else [],
    )
    for variant in VARIANTS.values()
    if variant.tiny
    for auto_name in get_family(variant.family).auto_classes
]
BASE_CASES = [pytest.param(variant.id, id=variant.id) for variant in VARIANTS.values() if variant.tiny]

# Families whose encoder has attention (ViT, Swin); MUSCLE (ResNet) and MACL (U-Net) are convolutional.
ATTENTION_FAMILIES = {"medcoss", "umedpt"}
# Detection outputs are losses and per-image detection lists; attention maps are not passed through them.
NO_ATTENTION_OUTPUT = {"AutoModelForObjectDetection"}
# MACL's encoder is a plain U-Net of conv blocks (few, shallow layers): checkpointing is asked for the ViT, Swin
# and ResNet encoders only.
CHECKPOINTING_FAMILIES = {"muscle", "medcoss", "umedpt"}


def _build(variant_id: str, auto_name: str, **overrides):
    variant = VARIANTS[variant_id]
    family = get_family(variant.family)
    config = variant.build_config(**overrides)
    torch.manual_seed(0)
    return family.auto_classes[auto_name](config).eval()


def _inputs(model, batch_size: int = 2) -> dict[str, torch.Tensor]:
    config = model.config
    family = get_family(config.model_type)
    inputs = family.example_inputs(config, batch_size, 0)
    name = type(model).__name__
    if name == "MaclForPreTraining":
        # The dominant branch down-samples the views, so their sides are multiples of a larger number.
        multiple = round(config.input_multiple / config.dominant_scale)
        shape = inputs["pixel_values"].shape
        spatial = [max(multiple, side // multiple * multiple) for side in shape[2:]]
        pixels = torch.randn(*shape[:2], *spatial, generator=torch.Generator().manual_seed(0))
        inputs["pixel_values"] = pixels
        inputs.update(
            dominant_pixel_values=pixels,
            spatial_pixel_values=pixels.flip(-1),
            dominant_spatial_pixel_values=pixels.flip(-1),
        )
    if name == "MedCossForPreTraining":
        patches = math.prod(side // config.patch_size for side in inputs["pixel_values"].shape[2:])
        inputs["noise"] = torch.rand(batch_size, patches, generator=torch.Generator().manual_seed(1))
    return inputs


def _cast(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()}


def _assert_same(first, second) -> None:
    """Exact equality of nested outputs (tensors, tuples, lists, dicts), strings left out."""
    if isinstance(first, torch.Tensor):
        torch.testing.assert_close(first, second, rtol=0, atol=0)
    elif isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            _assert_same(first[key], second[key])
    elif isinstance(first, (list, tuple)):
        first, second = [v for v in first if not isinstance(v, str)], [v for v in second if not isinstance(v, str)]
        assert len(first) == len(second)
        for a, b in zip(first, second):
            _assert_same(a, b)
    else:
        assert first == second


def _expected_hidden(config) -> tuple[int, list[int]]:
    """(the dim holding the width, the width of each hidden state) by the family's convention."""
    if config.model_type == "medcoss":
        return -1, [config.hidden_size] * (config.num_hidden_layers + 1)
    if config.model_type == "umedpt":
        return 1, [config.embed_dim] + config.stage_channels
    return 1, list(config.stage_channels)


@pytest.mark.parametrize("variant_id, auto_name", CASES)
def test_hidden_states_by_argument_and_by_config(variant_id, auto_name):
    model = _build(variant_id, auto_name)
    inputs = _inputs(model)
    axis, widths = _expected_hidden(model.config)
    with torch.no_grad():
        plain = model(**inputs)
        by_argument = model(**inputs, output_hidden_states=True)
        model.config.output_hidden_states = True
        by_config = model(**inputs)
    assert plain.hidden_states is None
    for output in (by_argument, by_config):
        assert [state.shape[axis] for state in output.hidden_states] == widths
        assert all(state.shape[0] == 2 for state in output.hidden_states)
    _assert_same(by_argument.hidden_states, by_config.hidden_states)


@pytest.mark.parametrize("variant_id, auto_name", CASES)
def test_attentions_one_per_layer(variant_id, auto_name):
    family = VARIANTS[variant_id].family
    if family not in ATTENTION_FAMILIES:
        pytest.skip(f"{family} is convolutional: no attention to return")
    if auto_name in NO_ATTENTION_OUTPUT:
        pytest.skip("detection outputs hold losses and detection lists, not encoder attentions")
    model = _build(variant_id, auto_name)
    inputs = _inputs(model)
    config = model.config
    layers = config.num_hidden_layers if family == "medcoss" else sum(config.depths)
    with torch.no_grad():
        by_argument = model(**inputs, output_attentions=True)
        model.config.output_attentions = True
        by_config = model(**inputs)
    for output in (by_argument, by_config):
        assert len(output.attentions) == layers
        for probabilities in output.attentions:
            assert probabilities.ndim == 4 and probabilities.shape[-1] == probabilities.shape[-2]
            torch.testing.assert_close(probabilities.sum(-1), torch.ones(probabilities.shape[:-1]))
    _assert_same(by_argument.attentions, by_config.attentions)
    heads = config.num_attention_heads if family == "medcoss" else config.num_heads[0]
    assert by_argument.attentions[0].shape[1] == heads


def test_attention_probabilities_are_the_ones_applied():
    """MedCoSS: probabilities @ values reproduces the fused SDPA context; UMedPT: the block output is unchanged when
    attentions are asked for."""
    medcoss = _build("medcoss-tiny", "AutoModel")
    attention = medcoss.encoder.layers[0].attention
    hidden = torch.randn(2, 5, medcoss.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probabilities = attention.probabilities(hidden)
        _, _, value = attention.qkv(hidden).view(2, 5, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
        context = (probabilities @ value).transpose(1, 2).reshape(2, 5, -1)
        torch.testing.assert_close(attention.out_proj(context), attention(hidden), rtol=1e-5, atol=1e-5)
    umedpt = _build("umedpt-tiny", "AutoModel")
    inputs = _inputs(umedpt)
    with torch.no_grad():
        _assert_same(umedpt(**inputs).last_hidden_state, umedpt(**inputs, output_attentions=True).last_hidden_state)


@pytest.mark.parametrize("variant_id, auto_name", CASES)
def test_tuple_output_equals_dataclass_and_eval_is_deterministic(variant_id, auto_name):
    model = _build(variant_id, auto_name)
    inputs = _inputs(model)
    with torch.no_grad():
        output = model(**inputs, output_hidden_states=True)
        again = model(**inputs, output_hidden_states=True)
        as_tuple = model(**inputs, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    _assert_same(as_tuple, output.to_tuple())
    _assert_same(output.to_tuple(), again.to_tuple())


@pytest.mark.parametrize("variant_id, auto_name", CASES)
def test_save_load_bit_exact_and_meta_init_equals_normal_init(variant_id, auto_name, tmp_path):
    model = _build(variant_id, auto_name)
    inputs = _inputs(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    _assert_same(loaded.state_dict(), model.state_dict())
    with torch.device("meta"):
        on_meta = type(model)(model.config)
    on_meta.to_empty(device="cpu")
    on_meta.init_weights()
    # Buffers are not learned: an initialisation on the meta device must re-create every one of them.
    _assert_same(dict(on_meta.named_buffers()), dict(model.named_buffers()))
    on_meta.load_state_dict(model.state_dict())
    with torch.no_grad():
        _assert_same(loaded.eval()(**inputs).to_tuple(), model(**inputs).to_tuple())
        _assert_same(on_meta.eval()(**inputs).to_tuple(), model(**inputs).to_tuple())


@pytest.mark.parametrize("variant_id, auto_name", CASES)
def test_every_tensor_is_a_parameter_or_buffer(variant_id, auto_name):
    model = _build(variant_id, auto_name)
    registered = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    for name, module in model.named_modules():
        for attribute, value in vars(module).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for tensor in values:
                if isinstance(tensor, torch.Tensor) and attribute not in ("_parameters", "_buffers"):
                    assert id(tensor) in registered, (
                        f"{name}.{attribute} is a tensor that is neither parameter nor buffer"
                    )


@pytest.mark.parametrize("variant_id, auto_name", CASES)
def test_bfloat16_from_pretrained_runs_forward(variant_id, auto_name, tmp_path):
    if auto_name == "AutoModelForObjectDetection":
        pytest.skip("torchvision's CPU nms kernel has no bfloat16 (detection post-processing); GPUs have one")
    model = _build(variant_id, auto_name)
    model.save_pretrained(tmp_path)
    half = type(model).from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with torch.no_grad():
        output = half(**_cast(_inputs(model), torch.bfloat16))
    first = output.to_tuple()[0]
    tensor = first[0] if isinstance(first, tuple) else first
    assert tensor.dtype == torch.bfloat16 and torch.isfinite(tensor.float()).all()


@pytest.mark.parametrize("variant_id, auto_name", CASES)
def test_input_embeddings(variant_id, auto_name):
    model = _build(variant_id, auto_name)
    family = VARIANTS[variant_id].family
    if family in ("muscle", "macl"):
        pytest.skip(f"{family} is a CNN: it has no patch or token embedding to return")
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, torch.nn.Module)
    assert any(isinstance(m, torch.nn.Conv2d) for m in embedding.modules())


@pytest.mark.parametrize("variant_id", BASE_CASES)
def test_gradient_checkpointing_gives_the_same_gradients(variant_id):
    family = VARIANTS[variant_id].family
    model = _build(variant_id, "AutoModel")
    if family not in CHECKPOINTING_FAMILIES:
        assert not model.supports_gradient_checkpointing
        pytest.skip("MACL's shallow U-Net encoder: checkpointing is offered for the ViT, Swin and ResNet encoders")
    inputs = _inputs(model)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(0)
        model(**inputs).last_hidden_state.pow(2).mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = gradients()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all(m.gradient_checkpointing for m in layers)
    calls = []
    original = layers[0]._gradient_checkpointing_func
    layers[0]._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or original(*a, **k)
    checkpointed = gradients()
    assert calls, "the first layer did not run under checkpointing"
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_backbone_stage_names_start_with_the_stem():
    for variant in VARIANTS.values():
        family = get_family(variant.family)
        if variant.tiny and "AutoBackbone" in family.auto_classes:
            config = variant.build_config()
            assert config.stage_names[0] == "stem"
            backbone = _build(variant.id, "AutoBackbone")
            assert len(backbone.num_features) == len(config.stage_names)


@pytest.mark.slow
@pytest.mark.parametrize("variant_id", BASE_CASES)
def test_torch_compile_forward(variant_id):
    model = _build(variant_id, "AutoModel")
    inputs = _inputs(model)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).pooler_output, model(**inputs).pooler_output)


@pytest.mark.slow
@pytest.mark.parametrize("variant_id", BASE_CASES)
def test_torch_export_base_model(variant_id):
    model = _build(variant_id, "AutoModel")
    inputs = _inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, args=(), kwargs=inputs)
    with torch.no_grad():
        exported = program.module()(**inputs)
        torch.testing.assert_close(exported.pooler_output, model(**inputs).pooler_output)


def test_umedpt_config_maps_num_attention_heads():
    config = VARIANTS["umedpt-tiny"].build_config()
    assert config.num_attention_heads == config.num_heads == [1, 2, 4, 8]
