"""User embedders: a VLM reading preference pairs (the paper), and pair-difference over an image encoder."""
