"""The exactly-once evaluation reader: every sample of shards or an image folder once across
all ranks and DataLoader workers, with its key (timm calls evaluation over webdataset "messy")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import IterableDataset

from wsl.data.bad_samples import DATA_ERRORS, SkipCounter
from wsl.data.folders import image_key, is_image_folder, labelled_images
from wsl.data.shards import expand_shard_spec, read_shard_samples, sample_hashtags, sample_image_bytes
from wsl.data.transforms import EvalTransform
from wsl.distributed import dataloader_worker, distributed_rank


class EvalDataset(IterableDataset):
    """Every sample of shards or an image folder exactly once across ranks and workers.

    Yields {"key", "image", "label"}: an image folder's class index (see `labelled_images`
    for the layouts, `classes` and `labels_file`); for shards the `.cls` member if present,
    else -1 and the hashtags (newline-joined) under "hashtags". Shards are shared among the
    (rank, worker) slots by `slot_share`: each sample once, each slot reading only its share.
    Corrupt images are skipped and logged (so
    each is counted, by being absent, once).
    """

    def __init__(
        self,
        source: str | Path,
        transform=None,
        rank: int | None = None,
        world_size: int | None = None,
        classes: list[str] | None = None,
        labels_file: str | Path | None = None,
    ):
        self.transform = transform or EvalTransform()
        if rank is None or world_size is None:
            rank, world_size = distributed_rank()
        self.rank, self.world_size = rank, world_size
        self.samples_read = 0  # samples this instance read from shards (in its own process), kept or not
        path = Path(str(source))
        self.folder_items: list[tuple[str, int]] | None = None
        if is_image_folder(path):
            self.classes, self.folder_items = labelled_images(path, classes, labels_file)
            self.root = path
        else:
            self.urls = expand_shard_spec(source)

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = dataloader_worker()
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        counter = SkipCounter(every=1)
        if self.folder_items is not None:
            for path, label in self.folder_items[slot::slots]:
                key = image_key(path, self.root)
                try:
                    yield {"key": key, "image": self.transform(Path(path).read_bytes()), "label": label}
                except DATA_ERRORS as exn:
                    counter.skip("corrupt_image", exn, key)
            return
        shards, every, keep = slot_share(len(self.urls), slot, slots)
        for index, sample in enumerate(read_shard_samples([self.urls[i] for i in shards])):
            self.samples_read += 1
            if index % every != keep:
                continue
            key = sample["__key__"]
            try:
                image = self.transform(sample_image_bytes(sample))
                hashtags = sample_hashtags(sample)
                label = int(sample["cls"]) if "cls" in sample else -1
            except DATA_ERRORS as exn:
                counter.skip("corrupt_image", exn, key)
                continue
            yield {"key": key, "image": image, "label": label, "hashtags": "\n".join(hashtags)}


def slot_share(num_shards: int, slot: int, slots: int) -> tuple[list[int], int, int]:
    """What one (rank, worker) slot of `slots` reads so that every sample is yielded exactly
    once: (its shards, m, r), keeping sample j of them (counted over its shards) when j % m == r.

    With at least as many shards as slots, slot s reads shards s, s + slots, ... whole. With
    fewer, slot s reads only shard s % n, which the ceil((slots - i) / n) slots sharing shard i
    split by sample index: each slot reads one shard, so the data is read at most
    ceil(slots / shards) times in all (not `slots` times, as when every slot read every shard).
    """
    if num_shards >= slots:
        return list(range(slot, num_shards, slots)), 1, 0
    shard = slot % num_shards
    sharing = len(range(shard, slots, num_shards))
    return [shard], sharing, slot // num_shards
