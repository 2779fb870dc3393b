"""Incremental detokenization (UTF-8 safe) and stop strings."""

from ling.infer.detokenize import IncrementalDetokenizer, StopStrings
from tests.scripted import byte_tokenizer

TEXT = "你好, world! 🎉😀 café"


def test_split_characters_come_out_whole_and_the_deltas_add_up():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode(TEXT)
    assert len(ids) == len(TEXT.encode())  # one token per byte: every non-ASCII character is split
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt "))
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert "你" in deltas and "🎉" in deltas and "é" in deltas
    assert deltas.count("") >= len(ids) - len(TEXT)  # a token that leaves a character unfinished shows nothing


def test_the_deltas_of_a_trained_bpe_add_up_to_its_decoding():
    from ling.tokenizer import Tokenizer

    tokenizer = Tokenizer.train_bpe([TEXT * 5, "hello world " * 20], vocab_size=300)
    ids = tokenizer.encode(TEXT * 2)
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join([detok.push(i) for i in ids] + [detok.flush()]) == tokenizer.decode(ids) == TEXT * 2


def test_an_unfinished_character_at_the_end_is_flushed_as_a_replacement():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("a🎉")[:-1]
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push(i) for i in ids] == ["a", "", "", ""]  # 3 of the emoji's 4 bytes
    assert detok.flush() == "\ufffd"


def test_stop_string_text_is_held_back_then_released_or_cut():
    stops = StopStrings(["END", "<|x|>"])
    assert stops.feed("Hello E") == "Hello "  # "E" may start "END"
    assert stops.feed("N") == ""
    assert stops.feed("Xtra <") == "ENXtra "
    assert stops.feed("|x|> more") == ""
    assert stops.stopped


def test_stop_string_split_across_pieces_and_the_earliest_wins():
    stops = StopStrings(["world", "lo w"])
    shown = "".join(stops.feed(piece) for piece in ["hel", "lo", " wo", "rld"])
    assert shown == "hel" and stops.stopped


def test_without_stop_strings_text_passes_through_and_flush_releases_the_rest():
    assert StopStrings([]).feed("anything") == "anything"
    stops = StopStrings(["STOP"])
    assert stops.feed("the ST") == "the "
    assert stops.flush() == "ST"
