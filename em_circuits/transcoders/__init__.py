"""Transcoders for a base without any: training (EleutherAI's sparsify) and the quality
measurement any set gets on held-out text (both models, the toy organism's build check)."""
