"""speechlm.training: synthetic data, interleaving, datasets and training loops."""
