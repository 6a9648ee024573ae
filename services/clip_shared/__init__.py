"""Pieces shared by the CLIP-family scorers (PickScore, HPSv2, aesthetic): PIL-exact image transforms on
uint8 tensors, checkpoint resolution and fingerprints, deterministic tiny models, and CLIP's BPE
tokenizer built offline (``tokenizer``; the shapes world's text encoders use it too).

Scorers import from here, never from each other.
"""
