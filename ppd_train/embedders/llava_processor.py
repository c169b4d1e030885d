"""A LLaVA-OneVision processor that works without torchvision.

transformers' ``LlavaOnevisionProcessor`` insists on a video processor, which needs torchvision. We only show still
images, so this subclass takes none; ``from_pretrained`` then resolves the PIL image processor from a stock checkpoint
folder (``processor_config.json`` / ``preprocessor_config.json``) with no conversion.
"""

from __future__ import annotations

from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.processing_utils import ProcessorMixin


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs) -> None:
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
