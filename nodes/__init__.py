"""ComfyUI nodes of the PPD pack. Always import within the pack relatively: ComfyUI has its own top-level ``nodes``.

Node ids and the order of each node's inputs are part of every saved workflow: never rename a node, never remove or
reorder an input; only append (``tests/node_api.json`` pins them).
"""

from .adapter_nodes import PPDAdapterLoader, PPDApplyAdapter, PPDStageCSampler
from .embedder_nodes import PPDVLMLoader, PPDVLMUserEmbedder
from .embedding_nodes import PPDEmbeddingInterpolate, PPDEmbeddingMix, PPDLoadUserEmbedding, PPDSaveUserEmbedding
from .pair_nodes import PPDPreferencePairLoader, PPDPreferencePairsFromImages
from .picker_nodes import PPDPreferencePicker
from .tune_nodes import PPDTuneUserEmbedding

_NODES = {
    "PPDPreferencePairLoader": (PPDPreferencePairLoader, "Preference Pair Loader"),
    "PPDPreferencePairsFromImages": (PPDPreferencePairsFromImages, "Preference Pairs From Images"),
    "PPDVLMLoader": (PPDVLMLoader, "VLM Loader (PPD)"),
    "PPDVLMUserEmbedder": (PPDVLMUserEmbedder, "VLM User Embedder"),
    "PPDEmbeddingInterpolate": (PPDEmbeddingInterpolate, "Embedding Interpolate"),
    "PPDEmbeddingMix": (PPDEmbeddingMix, "Embedding Mix"),
    "PPDSaveUserEmbedding": (PPDSaveUserEmbedding, "Save User Embedding"),
    "PPDLoadUserEmbedding": (PPDLoadUserEmbedding, "Load User Embedding"),
    "PPDAdapterLoader": (PPDAdapterLoader, "PPD Adapter Loader"),
    "PPDApplyAdapter": (PPDApplyAdapter, "Apply PPD Adapter"),
    "PPDStageCSampler": (PPDStageCSampler, "PPD Stage C Sampler"),
    "PPDPreferencePicker": (PPDPreferencePicker, "Preference Picker"),
    "PPDTuneUserEmbedding": (PPDTuneUserEmbedding, "Tune User Embedding"),
}

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in _NODES.items()}
