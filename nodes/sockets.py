"""Socket types the pack's nodes exchange, and small helpers every node module uses.

The type names are part of saved workflows: never rename them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ppd_train.adapter import PPDAdapter

PAIRS = "PPD_PREFERENCE_PAIRS"  # list[ppd_train.pairs.PreferencePair]
EMBEDDING = "PPD_USER_EMBEDDING"  # ppd_train.embedding.UserEmbedding
ADAPTER = "PPD_ADAPTER"  # NamedAdapter
VLM = "PPD_VLM"  # embedder_nodes.VLMHandle

CATEGORY = "PPD"


@dataclass(frozen=True)
class NamedAdapter:
    """A loaded adapter (float32, on the CPU until a sampling run needs it) and the file name used in messages."""

    name: str
    adapter: PPDAdapter


def tip(text: str, **options) -> dict:
    return {"tooltip": text, **options}
