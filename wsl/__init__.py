"""wsl: weakly-supervised (hashtag) pretraining of wide ResNeXt-101 32xNd, from shards to released weights."""

__version__ = "0.1.0"
