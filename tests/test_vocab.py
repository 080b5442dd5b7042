import collections
import json

import pytest
from conftest import hashtag_shards
from timm.data import ImageNetInfo

from wsl.data.vocab import (
    Vocabulary,
    build_synset_vocab,
    build_vocab,
    build_vocab_from_shards,
    lemma_hashtag,
)
from wsl.errors import WslError


def test_synonyms_are_merged_into_one_class_counted_from_real_shards(tmp_path):
    tags = [["Cat"], ["kitty"], ["#cat", "kitty"], ["dog"], ["puppy", "love"], ["love"]]
    hashtag_shards(tmp_path / "shards", tags, per_shard=4)
    (tmp_path / "syn.txt").write_text("cat: kitty\ndog: puppy\n")
    vocab = build_vocab_from_shards(str(tmp_path / "shards"), synonyms_file=str(tmp_path / "syn.txt"))
    assert vocab.tags == ["cat", "dog", "love"]
    assert [c.count for c in vocab.classes] == [4, 2, 2]  # an image with #cat and #kitty counts for both tags
    assert vocab.classes[0].synonyms == ("kitty",)
    assert vocab.class_ids(["KITTY", "#Cat", "puppy", "unknown"]) == [0, 1]


def test_top_k_and_min_count_select_the_most_frequent_classes():
    counts = collections.Counter({"a": 10, "b": 7, "c": 7, "d": 1})
    assert build_vocab(counts, top_k=2).tags == ["a", "b"]
    assert build_vocab(counts, min_count=2).tags == ["a", "b", "c"]


def test_soft_target_is_one_over_k_on_the_images_classes_and_sums_to_one():
    vocab = build_vocab(collections.Counter({"a": 3, "b": 2, "c": 1}))
    target = vocab.soft_target(vocab.class_ids(["c", "a", "zzz"]))
    assert target.tolist() == pytest.approx([0.5, 0.0, 0.5])
    assert float(target.sum()) == pytest.approx(1.0)


def test_the_imagenet_vocabulary_is_the_lemmas_of_the_1000_synsets_a_class_each_in_wnid_order():
    counts = collections.Counter({"tench": 5, "tincatinca": 2, "greatwhiteshark": 3, "maneater": 1, "love": 100})
    vocab = build_synset_vocab(counts, "imagenet-1k", synonyms={"tench": ["tinca"]})
    assert len(vocab) == 1000 and vocab.tags == sorted(vocab.tags) and vocab.tags[0] == "n01440764"
    assert vocab.tags == ImageNetInfo("imagenet-1k").label_names()  # the released 1000-class heads' order
    tench, shark = vocab.classes[0], vocab.classes[vocab.tags.index("n01484850")]
    assert set(tench.synonyms) == {"tench", "tincatinca", "tinca"} and tench.count == 7
    assert {"greatwhiteshark", "whiteshark", "maneater", "carcharodoncarcharias"} <= set(shark.synonyms)
    assert shark.count == 4 and vocab.class_ids(["#GreatWhiteShark", "#man-eater"]) == [vocab.tags.index("n01484850")]
    assert vocab.class_ids(["love"]) == [] and vocab.classes[1].count == 0  # no image: the class stays, count 0
    wordnet = vocab.meta["wordnet"]
    assert wordnet["covered"] == 2 and wordnet["synsets"] == 1000
    assert wordnet["collisions"]["cardigan"] == ["n02113186", "n02963159"]  # the corgi and the sweater
    assert vocab.class_ids(["cardigan"]) == [vocab.tags.index("n02113186")]  # the first in wnid order keeps it
    assert (
        lemma_hashtag("jack-o'-lantern") == "jackolantern" and lemma_hashtag("Great White Shark") == "greatwhiteshark"
    )


def test_the_wordnet_vocabulary_covers_all_21844_synsets_then_keeps_the_most_frequent():
    counts = collections.Counter({"dog": 9, "domesticdog": 1, "cat": 4, "tench": 2, "love": 50})
    vocab = build_synset_vocab(counts, "wordnet", top_k=2)
    assert vocab.meta["wordnet"]["synsets"] == 21844 and len(vocab) == 2
    dog = vocab.classes[0]
    assert "domesticdog" in dog.synonyms and dog.count >= 10 and vocab.classes[1].count >= 4
    assert vocab.class_ids(["love"]) == []


def test_vocabulary_file_round_trips_and_names_itself_by_hash(tmp_path):
    vocab = build_vocab(collections.Counter({"a": 3, "b": 2}), synonyms={"a": ["aa"]}, meta={"built_from": {"x": 1}})
    path = vocab.save(tmp_path / "v.json")
    loaded = Vocabulary.load(path)
    assert loaded.sha256 == vocab.sha256 and loaded.tags == ["a", "b"] and loaded.meta == {"built_from": {"x": 1}}
    data = json.loads(path.read_text())
    assert data["sha256"] == vocab.sha256 and data["classes"][0] == {
        "id": 0,
        "tag": "a",
        "count": 3,
        "synonyms": ["aa"],
    }
    data["classes"][1]["tag"] = "c"
    path.write_text(json.dumps(data))
    with pytest.raises(WslError, match="edited after it was built"):
        Vocabulary.load(path)


def test_a_vocabulary_for_other_shards_is_rejected_before_training(tmp_path):
    urls = [str(p) for p in hashtag_shards(tmp_path / "s", [["cat"], ["dog"]] * 3, per_shard=6)]
    assert build_vocab(collections.Counter({"cat": 1})).check_matches(urls) == pytest.approx(0.5)
    with pytest.raises(WslError, match="does not match the shards: none of the first 6 samples"):
        build_vocab(collections.Counter({"zebra": 1})).check_matches(urls)
