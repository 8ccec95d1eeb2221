"""The authors' MedCoSS checkpoint (`checkpoint-299.pth` of MedCoSS_Report_Xray_CT_MR_Path_Buffer0.05) -> a
`medcoss` repo.

The file is MAE's `save_model` dict (`model`, `optimizer`, `epoch`, `scaler`, `args` as an argparse Namespace) or a
bare state dict; it is read with `weights_only=True` and Namespace allow-listed. Every upstream key is renamed by
the table below; a key the table does not know fails the conversion, naming it. The MAE decoder, the MLM head and
Uni-Perceiver's unused video tables are kept with `--keep-pretraining-heads` (a `MedCossForPreTraining` repo) and
dropped otherwise. The converted config uses the `faithful` text mask, as the weights were trained with it.
"""

import argparse
import re
import shutil
from pathlib import Path

import torch

from hub.catalogue import get_variant
from hub.errors import ConversionError
from hub.export.checksums import write_checksums
from hub.export.repo import export_variant
from hub.models.medcoss import MedCossForPreTraining, MedCossModel

from .checkpoint import check_shapes, load_checkpoint, unwrap_state_dict
from .provenance import converted_provenance
from .registry import Converter

VARIANT = "medcoss-vitb"
LICENSE_TERMS = (
    "MedCoSS licence: non-commercial purposes only (for commercial use, contact yxia@nwpu.edu.cn), "
    "BSD-3-style terms otherwise; https://github.com/yeerwen/MedCoSS"
)
TRAINING_DATA = (
    "Converted from the authors' release; trained in sequence on MIMIC-CXR reports (MLM), MIMIC-CXR-JPG X-rays, "
    "DeepLesion CT, ADNI MRI and TCGA pathology tiles (MAE), with a 5% k-means rehearsal buffer and feature "
    "distillation; the first stage started from Uni-Perceiver-B (Apache-2.0). medhub did not train these weights."
)
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")

_LAYER = r"(\d+)"
# (upstream key pattern, medhub key template); `\1` carries the layer index. Encoder keys live under `medcoss.`
# in the pretraining model; pretraining keys are at its top level.
ENCODER_RENAMES: tuple[tuple[str, str], ...] = (
    (r"cls_token", "cls_token"),
    (rf"fused_encoder\.layers\.{_LAYER}\.self_attn\.in_proj_weight", r"encoder.layers.\1.attention.qkv.weight"),
    (rf"fused_encoder\.layers\.{_LAYER}\.self_attn\.in_proj_bias", r"encoder.layers.\1.attention.qkv.bias"),
    (
        rf"fused_encoder\.layers\.{_LAYER}\.self_attn\.out_proj\.(weight|bias)",
        r"encoder.layers.\1.attention.out_proj.\2",
    ),
    (rf"fused_encoder\.layers\.{_LAYER}\.linear1\.(weight|bias)", r"encoder.layers.\1.mlp.fc1.\2"),
    (rf"fused_encoder\.layers\.{_LAYER}\.linear2\.(weight|bias)", r"encoder.layers.\1.mlp.fc2.\2"),
    (rf"fused_encoder\.layers\.{_LAYER}\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (rf"fused_encoder\.layers\.{_LAYER}\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (rf"fused_encoder\.layers\.{_LAYER}\.gamma_1", r"encoder.layers.\1.layer_scale1"),
    (rf"fused_encoder\.layers\.{_LAYER}\.gamma_2", r"encoder.layers.\1.layer_scale2"),
    (r"token_embed\.embeddings\.weight", "text_embeddings.word_embeddings.weight"),
    (r"token_embed\.embeddings_pos\.position_embeddings\.weight", "text_embeddings.position_embeddings.weight"),
    (r"token_embed\.embeddings_token_type\.weight", "text_embeddings.token_type_embeddings.weight"),
    (r"token_embed\.embeddings_norm\.(weight|bias)", r"text_embeddings.layer_norm.\1"),
    (r"video_embed\.embeddings\.(weight|bias)", r"image_embeddings.patch_embeddings_2d.\1"),
    (r"video_embed\.embeddings_3D\.(weight|bias)", r"image_embeddings.patch_embeddings_3d.\1"),
    (r"video_embed\.embeddings_norm\.(weight|bias)", r"image_embeddings.layer_norm.\1"),
    (
        r"video_embed\.embeddings_st_pos_2D\.spatial_pos_embed\.weight",
        "image_embeddings.spatial_position_embeddings_2d.weight",
    ),
    (
        r"video_embed\.embeddings_st_pos_2D\.temporal_pos_embed\.weight",
        "image_embeddings.temporal_position_embeddings_2d.weight",
    ),
    (
        r"video_embed\.embeddings_st_pos_3D\.spatial_pos_embed\.weight",
        "image_embeddings.spatial_position_embeddings_3d.weight",
    ),
    (
        r"video_embed\.embeddings_st_pos_3D\.temporal_pos_embed\.weight",
        "image_embeddings.temporal_position_embeddings_3d.weight",
    ),
)
PRETRAINING_RENAMES: tuple[tuple[str, str], ...] = (
    (r"video_embed\.embeddings_pos\.position_embeddings\.weight", "legacy_video_position_embeddings"),
    (r"video_embed\.embeddings_type\.weight", "legacy_video_type_embeddings"),
    (r"decoder_embed\.(weight|bias)", r"decoder_embed.\1"),
    (r"mask_token", "mask_token"),
    (r"decoder_pos_embed_2D", "decoder_position_embeddings_2d"),
    (r"decoder_pos_embed_3D", "decoder_position_embeddings_3d"),
    (rf"decoder_blocks\.{_LAYER}\.(norm1|norm2)\.(weight|bias)", r"decoder_blocks.\1.\2.\3"),
    (rf"decoder_blocks\.{_LAYER}\.attn\.(qkv|proj)\.(weight|bias)", r"decoder_blocks.\1.attn.\2.\3"),
    (rf"decoder_blocks\.{_LAYER}\.mlp\.(fc1|fc2)\.(weight|bias)", r"decoder_blocks.\1.mlp.\2.\3"),
    (r"decoder_norm\.(weight|bias)", r"decoder_norm.\1"),
    (r"decoder_pred_2D\.(weight|bias)", r"decoder_pred_2d.\1"),
    (r"decoder_pred_3D\.(weight|bias)", r"decoder_pred_3d.\1"),
    (r"decoder_pos_embed_1D\.weight", "mlm_position_embeddings.weight"),
    (r"mlm_head\.transform\.dense\.(weight|bias)", r"mlm_head.dense.\1"),
    (r"mlm_head\.transform\.LayerNorm\.(weight|bias)", r"mlm_head.layer_norm.\1"),
    (r"mlm_head\.decoder\.weight", "mlm_head.decoder.weight"),
    (r"mlm_head\.bias", "mlm_head.bias"),
)


def medhub_key(upstream_key: str) -> tuple[str, bool] | None:
    """The medhub name of an upstream key (encoder names relative to `MedCossModel`) and whether it belongs to
    pretraining only; None for a key the table does not know."""
    for renames, pretraining in ((ENCODER_RENAMES, False), (PRETRAINING_RENAMES, True)):
        for pattern, template in renames:
            if re.fullmatch(pattern, upstream_key):
                return re.sub(pattern, template, upstream_key), pretraining
    return None


def rename_state_dict(
    tensors: dict[str, torch.Tensor], keep_pretraining_heads: bool, path: Path
) -> dict[str, torch.Tensor]:
    """Rename every upstream key; pretraining keys go to the top level (kept) or are dropped."""
    renamed = {}
    for key, value in tensors.items():
        mapped = medhub_key(key)
        if mapped is None:
            raise ConversionError(f"checkpoint {path} has key {key!r}, which is not part of the MedCoSS model")
        name, pretraining = mapped
        if pretraining and not keep_pretraining_heads:
            continue
        renamed[name if pretraining or not keep_pretraining_heads else f"medcoss.{name}"] = value
    return renamed


def check_against(model_class: type, config, state: dict[str, torch.Tensor], path: Path) -> None:
    """Name the first missing key or shape mismatch, checked on a meta-device model before building the real one."""
    with torch.device("meta"):
        expected = model_class(config).state_dict()
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise ConversionError(f"checkpoint {path} lacks {len(missing)} key(s) of the model, first {missing[0]!r}")
    check_shapes(state, expected, path)


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path, vocab_size: int) -> list[str]:
    """Copy a local WordPiece tokenizer folder (Bio_ClinicalBERT) into the repo; returns the copied names."""
    vocab = tokenizer_dir / "vocab.txt"
    if not vocab.is_file():
        raise ConversionError(f"tokenizer folder {tokenizer_dir} has no vocab.txt (a WordPiece vocabulary is expected)")
    entries = sum(1 for _ in vocab.open(encoding="utf-8"))
    if entries > vocab_size:
        raise ConversionError(f"tokenizer vocabulary {vocab} has {entries} entries, more than the model's {vocab_size}")
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
            copied.append(name)
    return copied


def convert_medcoss(
    checkpoint: Path,
    out_dir: Path,
    *,
    repo_id: str | None = None,
    license: str = "other",
    base_model: str | None = None,
    overwrite: bool = False,
    tokenizer_dir: Path | None = None,
    keep_pretraining_heads: bool = False,
    variant: str = VARIANT,
) -> Path:
    """Write a repo of catalogue `variant` (the paper-scale `medcoss-vitb` for the release) from `checkpoint`."""
    checkpoint = Path(checkpoint)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise ConversionError(f"tokenizer folder {tokenizer_dir} does not exist")
    raw = load_checkpoint(checkpoint)
    tensors = unwrap_state_dict(raw, checkpoint, ("model",))
    state = rename_state_dict(tensors, keep_pretraining_heads, checkpoint)
    variant = get_variant(variant)
    overrides = {"text_mask_mode": "faithful"}
    upstream_args = raw.get("args") if isinstance(raw, dict) else None
    if isinstance(upstream_args, argparse.Namespace):
        if hasattr(upstream_args, "mask_ratio"):
            overrides["mask_ratio"] = float(upstream_args.mask_ratio)
        if hasattr(upstream_args, "norm_pix_loss"):
            overrides["norm_pix_loss"] = bool(upstream_args.norm_pix_loss)
    model_class = MedCossForPreTraining if keep_pretraining_heads else MedCossModel
    config = variant.build_config(**overrides)
    check_against(model_class, config, state, checkpoint)
    model = model_class(config)
    model.load_state_dict(state, strict=True)
    provenance = converted_provenance(
        checkpoint,
        "medcoss",
        licence_note=LICENSE_TERMS,
        license=license,
        training_data=TRAINING_DATA,
        base_model=base_model,
        license_terms=LICENSE_TERMS,
        pretraining_heads=str(keep_pretraining_heads).lower(),
        text_mask_mode="faithful",
    )
    out = export_variant(model, out_dir, variant, provenance, repo_id=repo_id, overwrite=overwrite)
    if tokenizer_dir is not None:
        copy_tokenizer(Path(tokenizer_dir), out, model.config.vocab_size)
        write_checksums(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer-dir", type=Path, help="local Bio_ClinicalBERT tokenizer folder to copy into the repo"
    )
    parser.add_argument(
        "--keep-pretraining-heads",
        action="store_true",
        help="keep the MAE decoder and MLM head (MedCossForPreTraining)",
    )


CONVERTER = Converter(
    name="medcoss",
    help="the MedCoSS release (checkpoint-299.pth of MedCoSS_Report_Xray_CT_MR_Path_Buffer0.05)",
    default_license="other",
    convert=convert_medcoss,
    add_arguments=add_arguments,
    options=("tokenizer_dir", "keep_pretraining_heads"),
)
