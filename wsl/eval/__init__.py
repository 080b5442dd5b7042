"""Evaluation of frozen backbones: features, FAISS kNN, the linear probe, `wsl eval`."""
