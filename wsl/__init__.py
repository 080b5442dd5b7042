"""wsl: weakly-supervised (hashtag) pretraining of wide ResNeXt-101 32xNd, from shards to released weights."""

__version__ = "0.1.0"


def load_backbone(name_or_path, num_classes=None, head="auto", check_hash=False):
    """A released backbone in one line: see `wsl.release.export.load_backbone` (imported on first
    use, so `import wsl` stays light)."""
    from wsl.release.export import load_backbone as load

    return load(name_or_path, num_classes=num_classes, head=head, check_hash=check_hash)
