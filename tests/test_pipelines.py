"""transformers' pipelines on medhub repos take what the processor takes (DICOM paths included), and
``image-segmentation`` works for 2D segmentation heads with masks on the input's grid."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, pipeline

from hub.catalogue import VARIANTS
from hub.data.phantoms import chest_xray, write_dicom_image
from hub.errors import InputError
from hub.export import Provenance, export_repo
from hub.models import get_family


def _repo(tmp_path, variant_id: str, head: str):
    variant = VARIANTS[variant_id]
    config = variant.build_config(
        num_labels=2, id2label={0: "background", 1: "lung"}, label2id={"background": 0, "lung": 1}
    )
    torch.manual_seed(0)
    model = get_family(variant.family).auto_classes[head](config).eval()
    return export_repo(
        model,
        tmp_path / variant_id,
        variant=variant.id,
        provenance=Provenance("trained", "test"),
        processor=variant.build_processor(),
        modality=variant.modality,
    )


@pytest.fixture(scope="module")
def xray_dicom(tmp_path_factory):
    image = chest_xray(np.random.default_rng(3), size=96)["image"]
    return write_dicom_image(image, tmp_path_factory.mktemp("dcm") / "chest.dcm", "pipeline-test")


def test_feature_extraction_pipeline_reads_a_dicom_path(tmp_path, xray_dicom):
    repo = _repo(tmp_path, "muscle-resnet18-tiny", "AutoModel")
    extractor = pipeline("image-feature-extraction", model=str(repo))
    pooled = torch.tensor(extractor(str(xray_dicom), pool=True))
    processor = AutoImageProcessor.from_pretrained(repo)
    with torch.no_grad():
        expected = extractor.model(**processor(str(xray_dicom))).pooler_output
    torch.testing.assert_close(pooled.reshape(expected.shape), expected)


def test_segmentation_pipeline_gives_masks_on_the_input_grid(tmp_path, xray_dicom):
    repo = _repo(tmp_path, "muscle-resnet18-tiny", "AutoModelForSemanticSegmentation")
    segmenter = pipeline("image-segmentation", model=str(repo))
    png = tmp_path / "chest.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100), dtype=np.uint8)).save(png)
    for source, size in ((str(png), (100, 80)), (str(xray_dicom), (96, 96))):
        annotations = segmenter(source)
        processor = segmenter.image_processor
        inputs = processor(source, return_geometry=True)
        with torch.no_grad():
            logits = segmenter.model(pixel_values=inputs["pixel_values"]).logits
        expected = processor.post_process_semantic_segmentation({"logits": logits}, inputs["records"])[0].numpy()
        assert expected.shape == size[::-1]
        assert [a["label"] for a in annotations] == [
            segmenter.model.config.id2label[int(k)] for k in np.unique(expected)
        ]
        for annotation in annotations:
            assert annotation["mask"].size == size
            label = segmenter.model.config.label2id[annotation["label"]]
            np.testing.assert_array_equal(np.asarray(annotation["mask"]) == 255, expected == label)


def test_post_process_semantic_segmentation_resizes_to_target_sizes():
    processor = VARIANTS["muscle-resnet18-tiny"].build_processor()
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 2, :2] = 1.0
    logits[1, 1] = 1.0
    maps = processor.post_process_semantic_segmentation({"logits": logits}, target_sizes=[(8, 8), None])
    assert maps[0].shape == (8, 8) and maps[1].shape == (4, 4)
    assert (maps[0][:3] == 2).all() and (maps[0][5:] == 0).all() and (maps[1] == 1).all()
    with pytest.raises(ValueError, match="target_sizes holds 1 entries for a batch of 2"):
        processor.post_process_semantic_segmentation({"logits": logits}, target_sizes=[(8, 8)])


def test_segmentation_pipeline_sends_3d_models_to_the_processor(tmp_path):
    repo = _repo(tmp_path, "macl-unet3d-tiny", "AutoModelForSemanticSegmentation")
    segmenter = pipeline("image-segmentation", model=str(repo))
    with pytest.raises(InputError, match="processor.predict"):
        segmenter(np.zeros((8, 16, 16), dtype=np.float32))
