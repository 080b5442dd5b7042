import pytest

from wsl.data.hashtags import canonical_tag, extract_hashtags, load_synonyms, unique_canonical
from wsl.errors import WslError


def test_canonical_tag_folds_case_hash_and_unicode_forms():
    assert canonical_tag("#Cat") == canonical_tag("cat") == canonical_tag("  CAT ") == "cat"
    assert canonical_tag("＃ｃａｔ") == "cat"  # full-width, as typed on some phones
    assert canonical_tag("Café") == canonical_tag("Cafe\u0301")  # composed and decomposed é


def test_hashtags_are_extracted_from_captions_in_order():
    assert extract_hashtags("Sunday at the #Beach with my #kitty! #love_it #2024 no#") == [
        "Beach",
        "kitty",
        "love_it",
        "2024",
    ]


def test_unique_canonical_keeps_first_occurrence():
    assert unique_canonical(["Cat", "#cat", "dog", "", "CAT"]) == ["cat", "dog"]


def test_synonym_file_maps_each_line_to_one_class(tmp_path):
    path = tmp_path / "syn.txt"
    path.write_text("# comment line\ncat: kitty, #Kitten\ndog puppy\n\n")
    assert load_synonyms(path) == {"cat": ["kitty", "kitten"], "dog": ["puppy"]}


def test_synonym_in_two_classes_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "syn.txt"
    path.write_text("cat: kitty\ndog: kitty\n")
    with pytest.raises(WslError, match=r"syn.txt:2: 'kitty' is already a synonym of 'cat'"):
        load_synonyms(path)
