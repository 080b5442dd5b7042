"""The hashtag vocabulary: which hashtags are classes, their synonyms and counts.

Built by streaming the shards' JSON members (`wsl vocab`); saved as a versioned JSON file
whose `sha256` (over the class list) is how training runs and released checkpoints name
the vocabulary they used.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from wsl.config import REQUIRED, option
from wsl.data.hashtags import canonical_tag, load_synonyms, unique_canonical
from wsl.data.shards import expand_shard_spec, is_meta_member, read_shard_samples, sample_hashtags
from wsl.errors import WslError
from wsl.files import write_json
from wsl.parts import PartKeys, read_records, this_part, write_record

FORMAT = "wsl-vocab"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class VocabClass:
    tag: str
    count: int
    synonyms: tuple[str, ...] = ()


class Vocabulary:
    """Class ids for hashtags. `class_ids` maps an image's hashtags (as typed) to its classes."""

    def __init__(self, classes: list[VocabClass], meta: dict | None = None):
        if not classes:
            raise WslError("the vocabulary has no classes (lower min_count or raise top_k)")
        self.classes = list(classes)
        self.meta = dict(meta or {})
        self._lookup: dict[str, int] = {}
        for index, cls in enumerate(self.classes):
            for tag in (cls.tag, *cls.synonyms):
                if self._lookup.setdefault(tag, index) != index:
                    raise WslError(f"vocabulary tag '{tag}' belongs to two classes")

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def tags(self) -> list[str]:
        return [c.tag for c in self.classes]

    @property
    def counts(self) -> torch.Tensor:
        return torch.tensor([c.count for c in self.classes], dtype=torch.float64)

    @property
    def sha256(self) -> str:
        payload = [[c.tag, c.count, list(c.synonyms)] for c in self.classes]
        return hashlib.sha256(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()

    @property
    def short_hash(self) -> str:
        return self.sha256[:8]

    def class_ids(self, hashtags: list[str]) -> list[int]:
        """The distinct classes of an image's hashtags, in order of first appearance."""
        ids: dict[int, None] = {}
        for tag in hashtags:
            index = self._lookup.get(canonical_tag(tag))
            if index is not None:
                ids.setdefault(index, None)
        return list(ids)

    def soft_target(self, class_ids: list[int]) -> torch.Tensor:
        """The paper's target: 1/k on each of the image's k classes, 0 elsewhere."""
        target = torch.zeros(len(self.classes), dtype=torch.float32)
        target[class_ids] = 1.0 / len(class_ids)
        return target

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sha256": self.sha256,
            "num_classes": len(self.classes),
            **self.meta,
            "classes": [
                {"id": i, "tag": c.tag, "count": c.count, "synonyms": list(c.synonyms)}
                for i, c in enumerate(self.classes)
            ],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise WslError(f"vocabulary file not found: {path} (build one with `wsl vocab`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exn:
            raise WslError(f"{path} is not a vocabulary file: not JSON ({exn})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise WslError(f'{path} is not a vocabulary file (no "format": "{FORMAT}")')
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise WslError(
                f"{path} has vocabulary format {data['format_version']}; this wsl reads up to {FORMAT_VERSION}"
            )
        classes = [VocabClass(c["tag"], int(c["count"]), tuple(c.get("synonyms", ()))) for c in data["classes"]]
        meta = {
            k: v for k, v in data.items() if k not in ("format", "format_version", "sha256", "num_classes", "classes")
        }
        vocab = cls(classes, meta)
        if data.get("sha256") and data["sha256"] != vocab.sha256:
            raise WslError(f"{path} was edited after it was built (sha256 mismatch); rebuild it with `wsl vocab`")
        return vocab

    def check_matches(self, urls: list[str], max_samples: int = 1000) -> float:
        """Share of the first shard's samples with an in-vocabulary hashtag; error if none has one.

        Catches a vocabulary built for other shards before a long job starts.
        """
        seen = matched = 0
        for sample in read_shard_samples(urls[:1], members=is_meta_member):
            seen += 1
            matched += bool(self.class_ids(sample_hashtags(sample)))
            if seen >= max_samples:
                break
        if seen and not matched:
            raise WslError(
                f"vocabulary {self.short_hash} does not match the shards: none of the first {seen} samples "
                f"of {urls[0]} has a hashtag in it"
            )
        return matched / max(seen, 1)


def _count_shard(url: str) -> tuple[collections.Counter, int]:
    """Per-image counts of canonical hashtags in one shard (images are never read)."""
    counts: collections.Counter = collections.Counter()
    samples = 0
    for sample in read_shard_samples([url], members=is_meta_member):
        counts.update(unique_canonical(sample_hashtags(sample)))
        samples += 1
    return counts, samples


def count_hashtags(urls: list[str], workers: int = 1) -> tuple[collections.Counter, int]:
    """Stream every shard's hashtags, `workers` shards at a time: (tag -> images, images)."""
    total: collections.Counter = collections.Counter()
    samples = 0
    with cf.ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for counts, n in tqdm(pool.map(_count_shard, urls), total=len(urls), desc="counting hashtags", unit=" shards"):
            total.update(counts)
            samples += n
    return total, samples


def lemma_hashtag(lemma: str) -> str:
    """A WordNet lemma as users type it as a hashtag: 'great white shark' -> 'greatwhiteshark',
    "jack-o'-lantern" -> 'jackolantern' (lowercase; spaces, hyphens, apostrophes dropped)."""
    return canonical_tag("".join(ch for ch in lemma if ch.isalnum()))


def wordnet_lemmas(subset: str) -> dict[str, list[str]]:
    """WordNet id -> its lemmas as hashtags, from the word lists timm ships (nothing downloaded):
    subset "imagenet-1k", the 1,000 ImageNet-1k synsets (`timm.data.ImageNetInfo`), or
    "wordnet", all 21,844 noun synsets of `timm/data/_info/imagenet_synset_to_lemma.txt`."""
    from importlib.resources import files

    from timm.data import ImageNetInfo

    if subset == "imagenet-1k":
        info = ImageNetInfo("imagenet-1k")
        pairs = zip(info.label_names(), info.label_descriptions())
    else:
        text = (files("timm.data") / "_info" / "imagenet_synset_to_lemma.txt").read_text(encoding="utf-8")
        pairs = (line.split("\t", 1) for line in text.splitlines() if "\t" in line)
    lemmas = {}
    for wnid, names in pairs:
        tags = unique_canonical([lemma_hashtag(name) for name in names.split(",")])
        lemmas[wnid] = [t for t in tags if t]
    return lemmas


def build_synset_vocab(
    counts: collections.Counter,
    subset: str,
    *,
    synonyms: dict[str, list[str]] | None = None,
    top_k: int | None = None,
    min_count: int = 1,
    meta: dict | None = None,
) -> Vocabulary:
    """The paper's vocabularies: one class per WordNet synset, named by its id, whose hashtags
    are all its lemmas (and the user's synonyms of them).

    "imagenet-1k": all 1,000 classes, in sorted-wnid order, so the head maps onto the released
    1000-class heads (a class no image has keeps count 0). "wordnet": the 21,844 synsets, then
    `top_k` / `min_count` by image count, as for any vocabulary (the paper's 8.5k is the most
    frequent of its 17k). A hashtag that is a lemma of several synsets goes to the first in
    sorted-wnid order; the others are listed in the vocabulary's `meta["wordnet"]["collisions"]`.
    """
    lemmas = wordnet_lemmas(subset)
    owner: dict[str, str] = {}
    collisions: dict[str, list[str]] = {}
    for wnid in sorted(lemmas):
        for tag in lemmas[wnid]:
            if tag in owner:
                collisions.setdefault(tag, [owner[tag]]).append(wnid)
            else:
                owner[tag] = wnid
    for head, extra in (synonyms or {}).items():  # the user's synonyms of a lemma join its synset
        for tag in extra:
            if head in owner:
                owner.setdefault(tag, owner[head])
    tags_of: dict[str, list[str]] = collections.defaultdict(list)
    for tag, wnid in owner.items():
        tags_of[wnid].append(tag)
    count = {wnid: sum(counts.get(tag, 0) for tag in tags_of[wnid]) for wnid in lemmas}
    if subset == "imagenet-1k":
        kept = sorted(lemmas)
    else:
        ranked = sorted(lemmas, key=lambda wnid: (-count[wnid], wnid))
        kept = [wnid for wnid in ranked if count[wnid] >= min_count][:top_k]
    classes = [VocabClass(wnid, count[wnid], tuple(sorted(tags_of[wnid]))) for wnid in kept]
    meta = dict(meta or {})
    meta["wordnet"] = {
        "subset": subset,
        "synsets": len(lemmas),
        "covered": sum(1 for wnid in lemmas if count[wnid] > 0),
        "collisions": collisions,
        "collision_rule": "a hashtag shared by several synsets belongs to the first in sorted-wnid order",
    }
    return Vocabulary(classes, meta)


def build_vocab(
    counts: collections.Counter,
    *,
    synonyms: dict[str, list[str]] | None = None,
    top_k: int | None = None,
    min_count: int = 1,
    base_tags: list[str] | None = None,
    meta: dict | None = None,
) -> Vocabulary:
    """Merge synonyms into classes, then keep the `top_k` most frequent with at least `min_count` images.

    `counts` are per-image counts of canonical hashtags. A class's count is the sum over its
    tags (an image tagged with two synonyms counts twice: an upper bound, as the paper's
    counts are). With `base_tags` (e.g. the ImageNet-aligned set) only those tags and their
    synonyms become classes.
    """
    synonyms = synonyms or {}
    owner = {syn: head for head, syns in synonyms.items() for syn in syns}
    merged: collections.Counter = collections.Counter()
    members: dict[str, set[str]] = collections.defaultdict(set)
    for tag, n in counts.items():
        head = owner.get(tag, tag)
        merged[head] += n
        if head != tag:
            members[head].add(tag)
    candidates = set(merged) if base_tags is None else {owner.get(t, t) for t in base_tags}
    ranked = sorted(candidates, key=lambda tag: (-merged[tag], tag))
    kept = [tag for tag in ranked if merged[tag] >= min_count][:top_k]
    classes = [VocabClass(tag, merged[tag], tuple(sorted(set(synonyms.get(tag, [])) | members[tag]))) for tag in kept]
    return Vocabulary(classes, meta)


def build_vocab_from_shards(
    shards: str,
    *,
    synonyms_file: str | None = None,
    top_k: int | None = None,
    min_count: int = 1,
    synsets: str | None = None,
    workers: int = 1,
) -> Vocabulary:
    """Count the shards' hashtags and build a vocabulary: of the data's own hashtags, or with
    `synsets` ("imagenet-1k" or "wordnet") of WordNet synsets (`build_synset_vocab`)."""
    urls = expand_shard_spec(shards)
    counts, samples = count_hashtags(urls, workers)
    return vocab_from_counts(counts, samples, shards, len(urls), synonyms_file, top_k, min_count, synsets)


def vocab_from_counts(
    counts: collections.Counter,
    samples: int,
    shards: str,
    num_shards: int,
    synonyms_file: str | None = None,
    top_k: int | None = None,
    min_count: int = 1,
    synsets: str | None = None,
) -> Vocabulary:
    """The vocabulary of hashtag counts (one run's, or the sum of every part's)."""
    synonyms = load_synonyms(synonyms_file) if synonyms_file else {}
    meta = {
        "built_from": {
            "shards": shards,
            "num_shards": num_shards,
            "samples": samples,
            "synonyms_file": synonyms_file,
            "top_k": top_k,
            "min_count": min_count,
            "synsets": synsets,
        }
    }
    if synsets:
        return build_synset_vocab(counts, synsets, synonyms=synonyms, top_k=top_k, min_count=min_count, meta=meta)
    return build_vocab(counts, synonyms=synonyms, top_k=top_k, min_count=min_count, meta=meta)


def count_part(shards: str, out: str, part: int, parts: int, workers: int = 1) -> tuple[int, int]:
    """Count the hashtags of the shards whose index is `part` mod `parts` into a record beside
    `out`, for `merged_counts`; returns (shards, samples) counted."""
    urls = expand_shard_spec(shards)
    counts, samples = count_hashtags(urls[part::parts], workers)
    record = {"shards": shards, "num_shards": len(urls), "samples": samples, "counts": dict(sorted(counts.items()))}
    write_record(Path(out).parent, f"{Path(out).stem}-counts", part, parts, record)
    return len(urls[part::parts]), samples


def merged_counts(out: str) -> tuple[collections.Counter, int, str, int]:
    """(counts, samples, shards, number of shards) summed over every part's record."""
    records = read_records(Path(out).parent, f"{Path(out).stem}-counts")
    if len({(r["shards"], r["num_shards"]) for r in records}) != 1:
        raise WslError(f"the counting parts of {out} were run over different shards: run them again")
    counts: collections.Counter = collections.Counter()
    for record in records:
        counts.update(record["counts"])
    return counts, sum(r["samples"] for r in records), records[0]["shards"], records[0]["num_shards"]


@dataclass
class Config(PartKeys):
    """`wsl vocab`: count the shards' hashtags and write the hashtag vocabulary. In a job array
    each task counts its part of the shards (shard index mod parts), then one `merge=true` sums
    the counts and writes the vocabulary: the same file as one run."""

    shards: str = option(REQUIRED, "shards: paths, a directory, {a..b} patterns, URLs; '::' joins")
    out: str = option(REQUIRED, "vocabulary JSON to write")
    synonyms: str | None = option(None, "synonym file: `canonical: synonym, synonym` a line")
    top_k: int | None = option(None, "keep the k most frequent classes (null: all)", minimum=1)
    min_count: int = option(1, "keep classes with at least this many images", minimum=1)
    imagenet: bool = option(
        False, "the paper's ~1.5k-hashtag vocabulary: the lemmas of the 1,000 ImageNet-1k synsets, a class each"
    )
    wordnet: bool = option(
        False, "the paper's 17k-style vocabulary: the lemmas of all 21,844 WordNet noun synsets (then top_k/min_count)"
    )
    workers: int = option(os.cpu_count() or 1, "shards read at once", minimum=1)


def main(config: Config) -> str:
    if config.synonyms and not Path(config.synonyms).is_file():
        raise WslError(f"synonym file not found: {config.synonyms}")
    if config.imagenet and config.wordnet:
        raise WslError("imagenet=true and wordnet=true exclude each other: choose one")
    synsets = "imagenet-1k" if config.imagenet else "wordnet" if config.wordnet else None
    part = None if config.merge else this_part(config)
    if part is not None:
        shards, samples = count_part(config.shards, config.out, *part, config.workers)
        return (
            f"part {part[0]} of {part[1]}: counted {samples} samples of {shards} shards; when every part has "
            f"finished: wsl vocab ... merge=true"
        )
    if config.merge:
        counts, samples, shards, num_shards = merged_counts(config.out)
        if shards != config.shards:
            raise WslError(f"the parts counted shards={shards}, not {config.shards}")
    else:
        urls = expand_shard_spec(config.shards)
        counts, samples = count_hashtags(urls, config.workers)
        num_shards = len(urls)
    vocab = vocab_from_counts(
        counts, samples, config.shards, num_shards, config.synonyms, config.top_k, config.min_count, synsets
    )
    path = vocab.save(config.out)
    lines = [
        f"vocabulary {vocab.short_hash}: {len(vocab)} classes -> {path}",
        "  most frequent: "
        + ", ".join(f"#{c.tag} ({c.count})" for c in sorted(vocab.classes, key=lambda c: -c.count)[:8]),
    ]
    if "wordnet" in vocab.meta:
        wordnet = vocab.meta["wordnet"]
        shared = ", ".join(f"#{tag} ({'/'.join(wnids)})" for tag, wnids in list(wordnet["collisions"].items())[:3])
        lines.append(
            f"  the data covers {wordnet['covered']} of {wordnet['synsets']} synsets; "
            f"{len(wordnet['collisions'])} hashtags are lemmas of several synsets, each kept by the first in "
            f"sorted-wnid order{': ' + shared if shared else ''} (all in the file's meta.wordnet.collisions)"
        )
    return "\n".join(lines)
