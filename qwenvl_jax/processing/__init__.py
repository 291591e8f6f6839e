"""Host pipeline: numpy + PIL + tokenizers, never jax.

Messages, images and videos in; static-shape numpy batches out, with every size-dependent index
(M-RoPE positions, window permutation, segment ids, scatter slots) computed here.
"""

from qwenvl_jax.processing.batch import BatchSpec, collate, pad_to_length
from qwenvl_jax.processing.chat import ChatTemplate
from qwenvl_jax.processing.errors import InputError
from qwenvl_jax.processing.image import ImageConfig, load_image, process_image, process_images, smart_resize
from qwenvl_jax.processing.packing import ExampleSize, Packer, PackPlan, pack_examples, plan_batches
from qwenvl_jax.processing.positions import (
    VisionIndices,
    decode_position_ids,
    get_rope_index,
    vision_indices,
    window_gather,
)
from qwenvl_jax.processing.processor import Processor
from qwenvl_jax.processing.tokenizer import Tokenizer
from qwenvl_jax.processing.video import load_video, process_video, process_videos
from qwenvl_jax.processing.video_sampling import VideoConfig

__all__ = [
    "BatchSpec",
    "ChatTemplate",
    "ExampleSize",
    "ImageConfig",
    "InputError",
    "PackPlan",
    "Packer",
    "Processor",
    "Tokenizer",
    "VideoConfig",
    "VisionIndices",
    "collate",
    "decode_position_ids",
    "get_rope_index",
    "load_image",
    "load_video",
    "pack_examples",
    "pad_to_length",
    "plan_batches",
    "process_image",
    "process_images",
    "process_video",
    "process_videos",
    "smart_resize",
    "vision_indices",
    "window_gather",
]
