"""transformers' image pipelines, taking whatever :class:`MedicalImageProcessor` reads (DICOM, NIfTI, bytes...).

transformers' ``image-feature-extraction`` and ``image-segmentation`` pipelines open every input with PIL before
the processor sees it, so a DICOM path fails there. These subclasses hand the input to the processor unchanged
when the model's processor is a ``MedicalImageProcessor`` and behave exactly as transformers' otherwise.
Segmentation masks come back on the input's pixel grid (2D; 3D volumes: processor + model, see the README).
"""

from typing import Any

from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.image_feature_extraction import (
    ImageFeatureExtractionPipeline,
)
from transformers.pipelines.image_segmentation import ImageSegmentationPipeline

from .errors import InputError
from .processing import MedicalImageProcessor


class MedicalImageFeatureExtractionPipeline(ImageFeatureExtractionPipeline):
    def preprocess(self, image: Any, timeout: float | None = None, **image_processor_kwargs: Any) -> Any:
        if not isinstance(self.image_processor, MedicalImageProcessor):
            return super().preprocess(image, timeout=timeout, **image_processor_kwargs)
        return self.image_processor(image, return_tensors="pt", **image_processor_kwargs).to(self.dtype)


class MedicalImageSegmentationPipeline(ImageSegmentationPipeline):
    def preprocess(self, image: Any, subtask: str | None = None, timeout: float | None = None) -> Any:
        if not isinstance(self.image_processor, MedicalImageProcessor):
            return super().preprocess(image, subtask=subtask, timeout=timeout)
        if self.image_processor.spatial_dims != 2:
            raise InputError(
                "the image-segmentation pipeline takes 2D models; run a 3D model with its processor "
                "(processor.predict) instead"
            )
        inputs = self.image_processor(image, return_tensors="pt", return_geometry=True)
        records = inputs.pop("records")
        inputs.pop("images")
        inputs = inputs.to(self.dtype)
        inputs["target_size"] = records
        return inputs


def register_pipelines() -> None:
    """Point the two tasks at the subclasses above (the rest of each task's entry stays transformers')."""
    for task, pipeline_class in (
        ("image-feature-extraction", MedicalImageFeatureExtractionPipeline),
        ("image-segmentation", MedicalImageSegmentationPipeline),
    ):
        PIPELINE_REGISTRY.supported_tasks[task]["impl"] = pipeline_class
