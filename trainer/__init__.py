"""E2PO trainer: embedding-perturbed exploration on top of DiffusionNFT."""
