"""`medhub convert medcoss`: the upstream key table (reference A7) maps one-to-one onto the model, and back."""

import argparse
import json

import pytest
import torch
from huggingface_hub import ModelCard

from hub.catalogue import get_variant
from hub.convert.medcoss import convert_medcoss, medhub_key
from hub.errors import ConversionError
from hub.export import verify_repo, weights_metadata
from hub.export.checksums import sha256_file
from hub.models.medcoss import MedCossForPreTraining, MedCossModel


def upstream_shapes(
    h=768, layers=12, ffn=3072, vocab=49411, dec=512, dec_layers=8, dec_ffn=2048, dec_2d=197, dec_3d=145, patch=16
) -> dict[str, tuple[int, ...]]:
    """The released checkpoint's `model` keys and shapes, written from reference A7."""
    shapes = {"cls_token": (1, 1, h)}
    for i in range(layers):
        prefix = f"fused_encoder.layers.{i}."
        shapes |= {
            prefix + "self_attn.in_proj_weight": (3 * h, h),
            prefix + "self_attn.in_proj_bias": (3 * h,),
            prefix + "self_attn.out_proj.weight": (h, h),
            prefix + "self_attn.out_proj.bias": (h,),
            prefix + "linear1.weight": (ffn, h),
            prefix + "linear1.bias": (ffn,),
            prefix + "linear2.weight": (h, ffn),
            prefix + "linear2.bias": (h,),
            prefix + "norm1.weight": (h,),
            prefix + "norm1.bias": (h,),
            prefix + "norm2.weight": (h,),
            prefix + "norm2.bias": (h,),
            prefix + "gamma_1": (h,),
            prefix + "gamma_2": (h,),
        }
    shapes |= {
        "token_embed.embeddings.weight": (vocab, h),
        "token_embed.embeddings_norm.weight": (h,),
        "token_embed.embeddings_norm.bias": (h,),
        "token_embed.embeddings_pos.position_embeddings.weight": (512, h),
        "token_embed.embeddings_token_type.weight": (2, h),
        "video_embed.embeddings.weight": (h, 3, patch, patch),
        "video_embed.embeddings.bias": (h,),
        "video_embed.embeddings_3D.weight": (h, 1, patch, patch, patch),
        "video_embed.embeddings_3D.bias": (h,),
        "video_embed.embeddings_norm.weight": (h,),
        "video_embed.embeddings_norm.bias": (h,),
        "video_embed.embeddings_st_pos_2D.spatial_pos_embed.weight": (1024, h),
        "video_embed.embeddings_st_pos_2D.temporal_pos_embed.weight": (8, h),
        "video_embed.embeddings_st_pos_3D.spatial_pos_embed.weight": (4096, h),
        "video_embed.embeddings_st_pos_3D.temporal_pos_embed.weight": (8, h),
        "video_embed.embeddings_pos.position_embeddings.weight": (1600, h),
        "video_embed.embeddings_type.weight": (1, h),
        "decoder_embed.weight": (dec, h),
        "decoder_embed.bias": (dec,),
        "mask_token": (1, 1, dec),
        "decoder_pos_embed_2D": (1, dec_2d, dec),
        "decoder_pos_embed_3D": (1, dec_3d, dec),
        "decoder_norm.weight": (dec,),
        "decoder_norm.bias": (dec,),
        "decoder_pred_2D.weight": (patch**2 * 3, dec),
        "decoder_pred_2D.bias": (patch**2 * 3,),
        "decoder_pred_3D.weight": (patch**3, dec),
        "decoder_pred_3D.bias": (patch**3,),
        "decoder_pos_embed_1D.weight": (2, h),
        "mlm_head.transform.dense.weight": (h, h),
        "mlm_head.transform.dense.bias": (h,),
        "mlm_head.transform.LayerNorm.weight": (h,),
        "mlm_head.transform.LayerNorm.bias": (h,),
        "mlm_head.decoder.weight": (vocab, h),
        "mlm_head.bias": (vocab,),
    }
    for i in range(dec_layers):
        prefix = f"decoder_blocks.{i}."
        shapes |= {
            prefix + "norm1.weight": (dec,),
            prefix + "norm1.bias": (dec,),
            prefix + "norm2.weight": (dec,),
            prefix + "norm2.bias": (dec,),
            prefix + "attn.qkv.weight": (3 * dec, dec),
            prefix + "attn.qkv.bias": (3 * dec,),
            prefix + "attn.proj.weight": (dec, dec),
            prefix + "attn.proj.bias": (dec,),
            prefix + "mlp.fc1.weight": (dec_ffn, dec),
            prefix + "mlp.fc1.bias": (dec_ffn,),
            prefix + "mlp.fc2.weight": (dec, dec_ffn),
            prefix + "mlp.fc2.bias": (dec,),
        }
    return shapes


TINY = dict(h=32, vocab=1024, dec=16, dec_layers=1, dec_ffn=32, ffn=64, dec_2d=5, dec_3d=5)


def pretraining_key(upstream: str) -> str:
    name, pretraining = medhub_key(upstream)
    return name if pretraining else f"medcoss.{name}"


def test_every_upstream_key_maps_to_a_parameter_of_the_same_shape_and_back():
    shapes = upstream_shapes()
    assert len(shapes) == 300  # errata: the A7 table has 300 keys
    with torch.device("meta"):
        model = MedCossForPreTraining(get_variant("medcoss-vitb").build_config())
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    mapped = {pretraining_key(key): shape for key, shape in shapes.items()}
    assert len(mapped) == len(shapes)  # one-to-one
    assert mapped == ours  # every model tensor comes from exactly one upstream key, with its shape
    assert sum(torch.Size(shape).numel() for shape in shapes.values()) == 199_205_635


def random_checkpoint(path, shapes, wrap=True, extra=None):
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    state |= extra or {}
    args = argparse.Namespace(mask_ratio=0.75, norm_pix_loss=True, batch_size=128)
    torch.save({"model": state, "args": args, "epoch": 299} if wrap else state, path)
    return state


@pytest.mark.parametrize("keep", [True, False])
def test_convert_reload_gives_the_source_tensors(tmp_path, keep):
    source = random_checkpoint(tmp_path / "checkpoint-299.pth", upstream_shapes(**TINY))
    out = convert_medcoss(
        tmp_path / "checkpoint-299.pth", tmp_path / "repo", variant="medcoss-tiny", keep_pretraining_heads=keep
    )
    model = (MedCossForPreTraining if keep else MedCossModel).from_pretrained(out)
    assert model.config.text_mask_mode == "faithful" and model.config.architectures[0] == type(model).__name__
    state = model.state_dict()
    for key, value in source.items():
        name, pretraining = medhub_key(key)
        if pretraining and not keep:
            continue
        target = name if pretraining or not keep else f"medcoss.{name}"
        assert torch.equal(state[target], value), key
    assert len(state) == (len(source) if keep else sum(not medhub_key(k)[1] for k in source))
    assert verify_repo(out).golden_max_abs_diff == 0


def test_converted_repo_records_licence_and_sha256(tmp_path):
    random_checkpoint(tmp_path / "c.pth", upstream_shapes(**TINY), wrap=False)
    digest = sha256_file(tmp_path / "c.pth")
    out = convert_medcoss(tmp_path / "c.pth", tmp_path / "repo", variant="medcoss-tiny", repo_id="org/medcoss-vitb")
    metadata = weights_metadata(out / "model.safetensors")
    source = json.loads(metadata["source"])
    assert source["details"]["sha256"] == digest and "non-commercial" in source["details"]["license_terms"]
    assert source["license"] == "other"
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "other"
    assert digest in card.text and "non-commercial" in card.text and "not a medical device" in card.text


def test_unknown_key_fails_naming_it(tmp_path, cli):
    random_checkpoint(tmp_path / "c.pth", upstream_shapes(**TINY), extra={"head.weight": torch.zeros(2, 32)})
    result = cli("convert", "medcoss", tmp_path / "c.pth", "--out", tmp_path / "repo")
    assert result.code != 0
    assert "'head.weight'" in result.err and "Traceback" not in result.err


def test_wrong_shape_and_missing_key_fail_clearly(tmp_path):
    shapes = upstream_shapes(**TINY)
    random_checkpoint(tmp_path / "short.pth", {k: v for k, v in shapes.items() if k != "cls_token"})
    with pytest.raises(ConversionError, match="lacks 1 key.*'cls_token'"):
        convert_medcoss(tmp_path / "short.pth", tmp_path / "a", variant="medcoss-tiny")
    random_checkpoint(tmp_path / "wide.pth", upstream_shapes(**TINY))
    with pytest.raises(ConversionError, match=r"has shape \(1, 1, 32\), expected \(1, 1, 768\)"):
        convert_medcoss(tmp_path / "wide.pth", tmp_path / "b")


def test_cli_copies_the_tokenizer_and_keeps_heads(tmp_path, cli):
    from transformers import BertTokenizer

    random_checkpoint(tmp_path / "c.pth", upstream_shapes(**TINY))
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "acute", "effusion", "##s"]
    (tokenizer_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 112}))
    # The CLI converts the paper-scale variant; a tiny checkpoint must therefore be refused with a shape error.
    refused = cli("convert", "medcoss", tmp_path / "c.pth", "--out", tmp_path / "x", "--tokenizer-dir", tokenizer_dir)
    assert refused.code != 0 and "expected (1, 1, 768)" in refused.err
    out = convert_medcoss(
        tmp_path / "c.pth",
        tmp_path / "repo",
        variant="medcoss-tiny",
        tokenizer_dir=tokenizer_dir,
        keep_pretraining_heads=True,
    )
    assert (out / "vocab.txt").is_file() and "vocab.txt" in (out / "checksums.sha256").read_text()
    ids = BertTokenizer.from_pretrained(out)("No acute effusions")["input_ids"]
    assert ids == [2, 5, 6, 7, 8, 3]
    assert verify_repo(out).files_checked == 10  # the 8 repo files and 2 tokenizer files
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MedCossForPreTraining"]
    with pytest.raises(ConversionError, match="has no vocab.txt"):
        convert_medcoss(tmp_path / "c.pth", tmp_path / "r2", variant="medcoss-tiny", tokenizer_dir=tmp_path)
