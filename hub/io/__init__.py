"""Medical image input and output: readers with geometry, read limits, mask writers."""

from hub.io.image import MedicalImage
from hub.io.limits import DEFAULT_LIMITS, ReadLimits
from hub.io.read import ImageSource, from_array, read_image
from hub.io.sniff import sniff
from hub.io.writers import encode_mask, mask_to_sitk, write_mask

__all__ = [
    "DEFAULT_LIMITS",
    "ImageSource",
    "MedicalImage",
    "ReadLimits",
    "encode_mask",
    "from_array",
    "mask_to_sitk",
    "read_image",
    "sniff",
    "write_mask",
]
