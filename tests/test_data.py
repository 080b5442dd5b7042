"""The training stream and the evaluation reader, on real tar shards and real processes."""

import collections
import io
import json
import math
import pickle
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from conftest import hashtag_shards, jpeg_bytes, write_tar
from PIL import Image
from torchvision import transforms as T

from wsl.data.bad_samples import SkipCounter
from wsl.data.evalset import EvalDataset, slot_share
from wsl.data.shards import is_sample_member
from wsl.data.stream import HashtagTargets, ShardSource, StreamSeed, TrainDataConfig, TrainLoader
from wsl.data.transforms import EvalTransform, TrainTransform, decode_drafted
from wsl.data.vocab import Vocabulary, build_vocab
from wsl.errors import WslError


def _shard_hashtags(shards: Path) -> dict[str, list[str]]:
    tags = {}
    for path in shards.glob("*.tar"):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    tags[member.name[:-5]] = json.loads(tar.extractfile(member).read())["hashtags"]
    return tags


def test_targets_are_one_over_k_on_each_images_vocabulary_classes(demo):
    vocab: Vocabulary = demo["vocab"]
    config = TrainDataConfig(
        shards=str(demo["shards"]), vocab=str(demo["vocab_path"]), batch_size=16, num_workers=0, image_size=64
    )
    tags = _shard_hashtags(demo["shards"])
    loader = TrainLoader(config, vocab)
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 3, 64, 64) and batch["target"].shape == (16, len(vocab))
    assert torch.allclose(batch["target"].sum(1), torch.ones(16))
    for key, target in zip(batch["key"], batch["target"]):
        ids = vocab.class_ids(tags[key])
        assert sorted(target.nonzero().flatten().tolist()) == sorted(ids)
        assert torch.allclose(target[ids], torch.full((len(ids),), 1 / len(ids)))


@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_resampled_class_frequencies_match_the_predicted_distribution(tmp_path, exponent):
    # Zipfian single-hashtag images plus some with two hashtags.
    counts = {"c0": 800, "c1": 400, "c2": 200, "c3": 100, "c4": 50, "c5": 25}
    images = [[tag] for tag, n in counts.items() for _ in range(n)] + [["c0", "c5"]] * 30 + [["c1", "c4"]] * 30
    random.Random(0).shuffle(images)  # shards are random mixes, as real ones are
    urls = [str(p) for p in hashtag_shards(tmp_path, images, per_shard=400, image=b"bytes are not decoded here")]
    vocab = build_vocab(collections.Counter(t for tags in images for t in tags))
    stages = [
        ShardSource(urls, StreamSeed(seed=1)),
        wds.tarfile_to_samples(select_files=is_sample_member),
        HashtagTargets(vocab, exponent, StreamSeed(seed=1), SkipCounter()),
    ]
    empirical = torch.zeros(len(vocab), dtype=torch.float64)
    for n, sample in enumerate(wds.DataPipeline(*stages)):
        empirical[sample["class_ids"]] += 1 / len(sample["class_ids"])
        if n == 60_000:
            break
    empirical /= empirical.sum()
    # Predicted: each image weighted by the mean of n_c^-p over its classes, its mass spread 1/k.
    n_c = vocab.counts
    predicted = torch.zeros(len(vocab), dtype=torch.float64)
    natural = torch.zeros(len(vocab), dtype=torch.float64)
    for tags in images:
        ids = vocab.class_ids(tags)
        weight = float((n_c[ids] ** -exponent).mean())
        predicted[ids] += weight / len(ids)
        natural[ids] += 1 / len(ids)
    predicted, natural = predicted / predicted.sum(), natural / natural.sum()
    tolerance = 0.01  # absolute, per class; the natural distribution is >= 0.1 away
    assert (empirical - predicted).abs().max() < tolerance, (empirical, predicted)
    assert (natural - predicted).abs().max() > 10 * tolerance


def test_corrupt_images_and_out_of_vocabulary_samples_are_skipped_counted_and_never_slept_on(tmp_path):
    good, broken = jpeg_bytes(), jpeg_bytes(width=300, height=300)[:400]
    members = []
    for i in range(60):
        image = broken if i % 3 == 0 else good
        tags = ["zebra"] if i % 3 == 1 else ["cat"]
        members += [(f"{i:04d}.jpg", image), (f"{i:04d}.json", json.dumps({"hashtags": tags}).encode())]
    write_tar(tmp_path / "s-000000.tar", members)
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000000.tar": 60}))
    vocab = build_vocab(collections.Counter({"cat": 40}))
    config = TrainDataConfig(
        shards=str(tmp_path),
        vocab="",
        batch_size=5,
        num_workers=0,
        image_size=32,
        resample_exponent=0.0,
        resampled=False,
        shuffle_buffer=10,
    )
    loader = TrainLoader(config, vocab, rank=0, world_size=1)
    started = time.time()
    keys = [key for batch in loader for key in batch["key"]]
    assert time.time() - started < 5  # webdataset's warn_and_continue sleeps 0.5 s per error
    assert len(keys) == len(loader) * 5 == 60 and all(int(k) % 3 == 2 for k in keys)
    counts = loader.skip_counts
    assert counts["corrupt_image"] >= 20 and counts["dropped_no_vocab_hashtag"] >= 20


def test_errors_of_code_are_raised_not_counted_as_bad_data():
    counter = SkipCounter()
    assert counter.handler(OSError("truncated")) is True and counter.counts["unreadable"] == 1
    with pytest.raises(TypeError):
        counter.handler(TypeError("a bug"))


class _Payload:
    """A pickle that creates a file when unpickled: what a hostile shard would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_members_in_a_shard_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)
    assert marker.exists(), "the payload works when unpickled"
    marker.unlink()
    members = []
    for i in range(4):
        members += [
            (f"{i}.jpg", jpeg_bytes()),
            (f"{i}.json", b'{"hashtags": ["cat"]}'),
            (f"{i}.pth", payload),
            (f"{i}.pkl", payload),
            (f"{i}.pyd", payload),
        ]
    write_tar(tmp_path / "s-000000.tar", members)
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000000.tar": 4}))
    vocab = build_vocab(collections.Counter({"cat": 4}))
    loader = TrainLoader(
        TrainDataConfig(shards=str(tmp_path), vocab="", batch_size=2, num_workers=0, image_size=32), vocab
    )
    assert sum(len(b["key"]) for b in loader) == 4
    assert len(list(EvalDataset(tmp_path / "s-000000.tar"))) == 4
    assert not marker.exists()


def test_a_resumed_stream_is_reseeded_by_step_and_a_repeated_one_is_identical(demo):
    config = TrainDataConfig(
        shards=str(demo["shards"]), vocab="", batch_size=8, num_workers=0, image_size=32, shuffle_buffer=50
    )

    def first_keys(epoch: int, step: int) -> list[str]:
        loader = TrainLoader(config, demo["vocab"])
        loader.set_epoch(epoch, step)
        return next(iter(loader))["key"]

    assert first_keys(0, 0) == first_keys(0, 0)
    assert first_keys(0, 0) != first_keys(0, 40)
    assert first_keys(0, 0) != first_keys(1, 0)


def test_draft_decoding_reduces_large_jpegs_and_matches_a_full_decode():
    data = jpeg_bytes(width=1600, height=1200)
    image, box = decode_drafted(Image.open(io.BytesIO(data)), (0, 0, 1600, 1200), 224)
    assert image.size == (400, 300) and box == (0, 0, 400, 300)  # 1/4 scale: the shorter side stays >= 224
    small_crop, _ = decode_drafted(Image.open(io.BytesIO(data)), (100, 100, 400, 400), 224)
    assert small_crop.size == (1600, 1200)  # a 300-px crop needs every pixel
    photo = io.BytesIO()
    smooth = Image.radial_gradient("L").resize((1600, 1200)).convert("RGB")
    smooth.save(photo, format="JPEG", quality=95)
    reference = T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )
    expected = reference(Image.open(io.BytesIO(photo.getvalue())).convert("RGB"))
    got = EvalTransform()(photo.getvalue())
    assert got.shape == expected.shape == (3, 224, 224)
    assert (got - expected).abs().mean() < 0.02
    assert TrainTransform(96)(data).shape == (3, 96, 96)


# ---------------------------------------------------------------- two real processes (gloo)


def _init(rank: int, world_size: int, rendezvous: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)


def _eval_rank(rank: int, source: str, rendezvous: str, out: str) -> None:
    _init(rank, 2, rendezvous)
    loader = torch.utils.data.DataLoader(
        EvalDataset(source, transform=EvalTransform(32, 36)), batch_size=3, num_workers=2
    )
    keys = [key for batch in loader for key in batch["key"]]
    Path(out, f"rank{rank}.json").write_text(json.dumps(keys))
    dist.barrier()
    dist.destroy_process_group()


def _run_two_ranks(fn, *args) -> None:
    mp.start_processes(fn, args=args, nprocs=2, join=True, start_method="spawn")


@pytest.mark.slow
@pytest.mark.parametrize("num_shards", [9, 3])  # more shards than rank x worker slots, and fewer
def test_two_processes_with_two_workers_each_read_every_eval_sample_exactly_once(tmp_path, num_shards):
    per_shard = 7
    hashtag_shards(tmp_path / "shards", [["cat"]] * (num_shards * per_shard), per_shard=per_shard)
    _run_two_ranks(_eval_rank, str(tmp_path / "shards"), str(tmp_path / "rdzv"), str(tmp_path))
    keys = [k for r in range(2) for k in json.loads((tmp_path / f"rank{r}.json").read_text())]
    assert sorted(keys) == [f"{i:07d}" for i in range(num_shards * per_shard)]
    assert all(json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))


@pytest.mark.slow
def test_two_processes_read_every_image_of_a_folder_exactly_once(demo, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(demo["summary"]["downstream"] + "/val", val)
    next(val.rglob("*.JPEG")).unlink()  # 29 images: an odd count, so padding would show
    _run_two_ranks(_eval_rank, str(val), str(tmp_path / "rdzv"), str(tmp_path))
    keys = [k for r in range(2) for k in json.loads((tmp_path / f"rank{r}.json").read_text())]
    expected = sorted(str(p.relative_to(val).with_suffix("")) for p in val.rglob("*.JPEG"))
    assert len(expected) == 29
    assert sorted(keys) == expected


def test_folders_take_torchvisions_image_extensions_and_reading_one_for_dedup_imports_no_torchvision(demo):
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from wsl.data.folders import IMAGE_EXTENSIONS

    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS
    val = demo["summary"]["downstream"] + "/val"
    script = (
        "import sys; from wsl.dedup.index import evaluation_images; "
        f"print(len(list(evaluation_images({val!r}))), 'torchvision' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["30", "False"]  # ~2 s of every `wsl dedup` start


def _train_rank(rank: int, shards: str, rendezvous: str, out: str) -> None:
    _init(rank, 2, rendezvous)
    vocab = build_vocab(collections.Counter({"cat": 25}))
    config = TrainDataConfig(
        shards=shards,
        vocab="",
        batch_size=4,
        num_workers=1,
        image_size=32,
        resample_exponent=0.0,
        resampled=False,
        shuffle_buffer=4,
    )
    loader = TrainLoader(config, vocab)
    keys = []
    for batch in loader:
        keys += batch["key"]
        dist.all_reduce(torch.ones(1))  # as DDP's gradient sync: hangs if one rank stops early
    Path(out, f"rank{rank}.json").write_text(json.dumps({"batches": len(keys) // 4, "len": len(loader), "keys": keys}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_given_unequal_shards_yield_the_same_number_of_batches(tmp_path):
    shards = hashtag_shards(tmp_path / "shards", [["cat"]] * 25, per_shard=10)  # 10 + 10 + 5 samples
    _run_two_ranks(_train_rank, str(tmp_path / "shards"), str(tmp_path / "rdzv"), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == ranks[0]["len"] == 4  # ceil(25 / (4 x 2))
    shards_read = [{k[:-1] for k in r["keys"]} for r in ranks]  # keys 00000NN: shard = key // 10
    assert len(shards_read[0]) != len(shards_read[1]) and not shards_read[0] & shards_read[1]
    assert len(shards) == 3


@pytest.mark.parametrize(("samples", "per_shard", "slots"), [(12, 5, 8), (30, 4, 3), (7, 1, 7), (20, 2, 4)])
def test_evaluation_slots_yield_every_key_once_and_read_the_data_at_most_ceil_slots_over_shards_times(
    tmp_path, samples, per_shard, slots
):
    hashtag_shards(tmp_path, [["cat"]] * samples, per_shard=per_shard)
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    readers = [EvalDataset(str(tmp_path), EvalTransform(16, 16), rank=slot, world_size=slots) for slot in range(slots)]
    keys = [sample["key"] for reader in readers for sample in reader]
    assert sorted(keys) == [f"{i:07d}" for i in range(samples)], "every key exactly once"
    read = sum(reader.samples_read for reader in readers)  # counted while reading, not computed
    assert read <= math.ceil(slots / len(shards)) * samples, (read, len(shards), slots)


def test_the_3360_slot_case_reads_each_held_out_shard_168_times_instead_of_3360():
    reads = collections.Counter(shard for slot in range(3360) for shard in slot_share(20, slot, 3360)[0])
    assert reads == {shard: 168 for shard in range(20)}


def test_too_few_shards_without_resampling_is_an_error_in_the_main_process_before_any_worker_starts(tmp_path):
    hashtag_shards(tmp_path, [["cat"]] * 12, per_shard=4)  # 3 shards
    vocab = build_vocab(collections.Counter({"cat": 12}))
    config = TrainDataConfig(shards=str(tmp_path), batch_size=2, num_workers=2, image_size=16, resampled=False)
    with pytest.raises(WslError, match="3 shards are too few for 2 ranks x 2 workers without resampling"):
        TrainLoader(config, vocab, rank=1, world_size=2)  # constructing it is enough: no iteration, no worker
    assert len(TrainLoader(config, vocab, rank=0, world_size=1)) == 6  # 3 shards for 1 x 2 slots: fine


@pytest.mark.parametrize("workers", [0, 1])
def test_two_ranks_draw_different_crops_of_the_same_images(tmp_path, workers):
    hashtag_shards(tmp_path, [["cat"]] * 16, per_shard=4, image=jpeg_bytes(96, 96, seed=3))  # one image, 16 times
    vocab = build_vocab(collections.Counter({"cat": 16}))
    config = TrainDataConfig(shards=str(tmp_path), batch_size=4, num_workers=workers, image_size=32, shuffle_buffer=0)
    first = []
    for rank in range(2):
        torch.manual_seed(0)  # what seed_everything does on every rank: the same main-process RNG
        first.append(next(iter(TrainLoader(config, vocab, rank=rank, world_size=2)))["image"])
    assert not torch.equal(first[0], first[1]), "both ranks drew the same crops and flips"
    torch.manual_seed(0)
    again = next(iter(TrainLoader(config, vocab, rank=0, world_size=2)))["image"]
    assert torch.equal(again, first[0]), "and a rank's draws are reproducible"
