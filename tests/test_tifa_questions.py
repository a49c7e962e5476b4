"""The TIFA question download keeps only the upstream file, identified by its git blob hash."""

import pytest

from evalkit.errors import DatasetError
from evalkit.paths import PROJECT_ROOT
from evalkit.scoring.tifa import load_questions
from evalkit.tifa_questions import download, git_blob_sha1

UPSTREAM = PROJECT_ROOT.parent / "shared" / "data" / "tifa"


@pytest.mark.skipif(not UPSTREAM.is_dir(), reason="needs ../shared/data beside the checkout")
def test_blob_hash_equals_what_the_upstream_commit_records():
    # `git ls-tree 8e37050 tifa_v1.0/` lists the text inputs as blob ac00985c...
    data = (UPSTREAM / "tifa_v1.0_text_inputs.json").read_bytes()
    assert git_blob_sha1(data) == "ac00985c8f552a3e51b3ef84ac7bfd0e59e41500"


def test_download_keeps_the_verified_file_and_rejects_another(tmp_path):
    source = tmp_path / "served.json"
    source.write_text('[{"id": "a", "caption": "a cat", "question": "is there a cat?", "choices": ["yes", "no"], '
                      '"answer": "yes", "element_type": "animal/human", "element": "cat"}]')
    out = tmp_path / "questions.json"
    with pytest.raises(DatasetError, match="not the upstream one"):
        download(out, source.as_uri())
    assert not out.exists()
    download(out, source.as_uri(), expected_blob=git_blob_sha1(source.read_bytes()))
    assert list(load_questions(out)) == ["a"]
    with pytest.raises(DatasetError, match="cannot download"):
        download(tmp_path / "x.json", (tmp_path / "absent.json").as_uri())


def test_a_missing_question_file_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="python -m evalkit.tifa_questions --out"):
        load_questions(tmp_path / "tifa_v1.0_question_answers.json")
