"""Tokenizers: exact Unicode round trips, char-level vocabulary, HF loadability."""

import pytest
from transformers import PreTrainedTokenizerFast

from ling.errors import LingError
from ling.tokenizer import BOS, EOS, PAD, Tokenizer

CORPUS = ["To be, or not to be: that is the question.\n", "Whether 'tis nobler in the mind to suffer\n"] * 20
HARD_TEXTS = [
    "",
    "你好，世界！这是一个测试。",
    "emoji 🎉🚀 and a family 👨‍👩‍👧‍👦 and flags 🇯🇵",
    "control \x00\x01\x02\t\r\n\x0b\x0c\x1b\x7f chars",
    "   leading spaces, trailing   \n\n\n",
    "mixed Ελληνικά, русский, العربية, हिन्दी",
    "combining é vs é and zero-width\u200bjoin",
]


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe(CORPUS, vocab_size=300)


def test_bpe_round_trip_is_exact_for_arbitrary_unicode(bpe):
    for text in HARD_TEXTS:
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_has_requested_vocab_size_and_special_tokens(bpe):
    assert bpe.vocab_size == 300
    for token in (BOS, EOS, PAD):
        assert bpe.token_to_id(token) is not None
    assert bpe.encode(EOS) == [bpe.eos_id]
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)


def test_bpe_vocab_too_small_is_a_clear_error():
    with pytest.raises(LingError, match="at least 259"):
        Tokenizer.train_bpe(CORPUS, vocab_size=100)


def test_char_level_ids_follow_sorted_characters_then_specials():
    tok = Tokenizer.train_char(["hello world\n"])
    chars = sorted(set("hello world\n"))
    assert [tok.token_to_id(c) for c in chars] == list(range(len(chars)))
    assert tok.token_to_id(BOS) == len(chars)
    assert tok.vocab_size == len(chars) + 4  # bos, eos, pad, unk
    assert tok.decode(tok.encode("hello\nworld")) == "hello\nworld"
    assert tok.is_char_level


def test_char_level_reports_unknown_characters():
    tok = Tokenizer.train_char(["abc"])
    with pytest.raises(LingError, match=r"'é' \(U\+00E9\) at offset 2"):
        tok.encode("abé")


def test_saved_tokenizer_loads_in_transformers_with_identical_ids(tmp_path, bpe):
    bpe.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in HARD_TEXTS[1:]:
        assert hf(text)["input_ids"] == bpe.encode(text)
        assert hf.decode(bpe.encode(text)) == text


def test_save_and_load_keeps_special_tokens_and_template(tmp_path, bpe):
    bpe.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    bpe.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.chat_template == bpe.chat_template
    assert (again.bos_id, again.eos_id, again.pad_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)
    assert again.encode("question 你好") == bpe.encode("question 你好")
    assert again.hash() == bpe.hash()


def test_loading_a_missing_or_corrupt_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(LingError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LingError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_encode_corpus_treats_special_token_strings_as_plain_text(bpe):
    """Raw corpus text may contain "<|eos|>" literally; that must not become a document boundary."""
    ids = bpe.encode_corpus(["a literal <|eos|> inside"])[0]
    assert bpe.eos_id not in ids.tolist()
    assert bpe.decode(ids.tolist()) == "a literal <|eos|> inside"
    assert bpe.encode(EOS) == [bpe.eos_id]  # ordinary encode still parses special tokens
    for text in HARD_TEXTS:
        assert bpe.decode(bpe.encode_corpus([text])[0].tolist()) == text


def test_encode_corpus_char_level_maps_every_character_to_its_id():
    texts = ["hello <|eos|>", "", "wörld\n"]
    tok = Tokenizer.train_char(texts)
    for text, ids in zip(texts, tok.encode_corpus(texts)):
        assert ids.dtype == "uint32"
        assert ids.tolist() == [tok.token_to_id(c) for c in text]
    with pytest.raises(LingError, match=r"'é' \(U\+00E9\) at offset 1"):
        tok.encode_corpus(["hé"])


def test_encode_corpus_char_level_with_a_normalizer_goes_through_the_backend():
    from tokenizers import normalizers

    tok = Tokenizer.train_char(["abc"])
    tok.backend.normalizer = normalizers.Lowercase()
    lowered = Tokenizer(tok.backend, tok.config)
    assert lowered.encode_corpus(["AbC"])[0].tolist() == [tok.token_to_id(c) for c in "abc"]
