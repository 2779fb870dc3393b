"""Fine-tuning data: format detection, malformed records, chat templates, loss masks, packing."""

import json

import pytest
import torch

from ling.config import ModelConfig
from ling.data.sft import Example, read_examples
from ling.data.sft_batches import SFTBatches, collate, pack_examples
from ling.data.sft_encode import CHATML_TEMPLATE, IGNORE, IM_END, IM_START, Encoded, encode_example, install_chatml
from ling.data.synthetic import held_out_split, make_examples, to_messages
from ling.errors import LingError
from ling.model import build_model
from ling.tokenizer import Tokenizer

CHAT = [
    {"role": "system", "content": "be kind"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "ok"},
]


def write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture
def char_tokenizer():
    tok = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz ?!.,\n0123456789+"])
    install_chatml(tok)
    return tok


# ---- formats ------------------------------------------------------------------------------
def test_each_format_is_detected_and_normalised(tmp_path):
    alpaca = write(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "1 + 2", "output": "3"},
                                          {"instruction": "Say hi.", "output": "hi"}])
    records = read_examples(alpaca)
    assert records.format == "alpaca"
    assert records.examples[0].messages == [{"role": "user", "content": "Add.\n\n1 + 2"},
                                            {"role": "assistant", "content": "3"}]
    assert records.examples[1].messages[0]["content"] == "Say hi."

    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"instruction": "i", "output": "o"}] * 3, indent=2))
    assert read_examples(array).format == "alpaca" and len(read_examples(array).examples) == 3

    messages = write(tmp_path / "m.jsonl", [{"messages": CHAT}])
    assert read_examples(messages).format == "messages"
    assert read_examples(messages).examples[0].messages == CHAT

    sharegpt = write(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "be kind"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    assert read_examples(sharegpt).format == "sharegpt"
    assert read_examples(sharegpt).examples[0].messages == CHAT[:3]

    text = write(tmp_path / "t.jsonl", [{"text": "once upon a time"}])
    records = read_examples(text)
    assert (records.format, records.examples[0].text) == ("text", "once upon a time")

    both = write(tmp_path / "b.jsonl", [{"text": "t", "instruction": "i", "output": "o"}])
    assert read_examples(both).format == "alpaca"
    assert read_examples(both, data_format="text").examples[0].text == "t"

    labelled = write(tmp_path / "c.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": 0}])
    records = read_examples(labelled, label_field="label")
    assert [(e.text, e.label) for e in records.examples] == [("good", "pos"), ("bad", 0)]


BAD_RECORDS = [
    ("{not json", "invalid JSON"),
    ('"just text"', "must be a JSON object, got str"),
    ({"instruction": "i"}, "missing 'output'"),
    ({"instruction": "i", "output": 3}, "'output' must be a string, got int"),
    ({"instruction": "  ", "output": "o"}, "'instruction' is empty"),
    ({"instruction": "i", "input": ["x"], "output": "o"}, "'input' must be a string, got list"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": "hi"}, "'messages' must be a list of turns, got str"),
    ({"messages": ["hi"]}, r"messages\[0\] must be an object, got str"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] has no 'content'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\] has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 1}]}, r"messages\[0\].content must be a string, got int"),
    ({"messages": [{"role": "user", "content": "x"}]}, "'messages' has no assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
     r"messages\[1\] is a system message; only the first"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\] has unknown from 'bot'"),
    ({"conversations": [{"from": "gpt"}]}, r"conversations\[0\] has no 'value'"),
    ({"text": ""}, "'text' is empty"),
    ({"prompt": "x", "completion": "y"}, "cannot tell the data format .keys: completion, prompt.*--data-format"),
]


@pytest.mark.parametrize("record,reason", BAD_RECORDS, ids=[r for _, r in BAD_RECORDS])
def test_a_malformed_record_is_reported_with_file_line_and_reason(tmp_path, record, reason):
    path = write(tmp_path / "d.jsonl", [record])
    with pytest.raises(LingError, match=rf"d\.jsonl:1: (a record )?{reason}.*--skip-bad-records"):
        read_examples(path)


def test_bad_record_after_good_ones_names_its_line_and_can_be_skipped(tmp_path):
    good = {"messages": CHAT[1:3]}
    path = write(tmp_path / "d.jsonl", [good, "", good, {"messages": [{"role": "user", "content": "q"}]}, "{oops", good])
    with pytest.raises(LingError, match=r"d\.jsonl:4: 'messages' has no assistant turn.*\[messages format\]"):
        read_examples(path)
    records = read_examples(path, skip_bad_records=True)
    assert len(records.examples) == 3
    assert [s.split(": ")[0].rsplit(":", 1)[1] for s in records.skipped] == ["4", "5"]
    assert records.examples[2].where.endswith("d.jsonl:6")
    # a record of another format in a messages file is bad too
    path = write(tmp_path / "mixed.jsonl", [good, {"instruction": "i", "output": "o"}])
    with pytest.raises(LingError, match=r"mixed\.jsonl:2: missing 'messages' \(keys present: instruction, output\)"):
        read_examples(path)


def test_json_array_errors_name_the_line_of_the_record(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "i", "output": "o"},\n  {"instruction": "i"},\n  {"instruction": "i", "output": "o"}\n]\n')
    with pytest.raises(LingError, match=r"a\.json:3: missing 'output'"):
        read_examples(path)
    assert len(read_examples(path, skip_bad_records=True).examples) == 2
    path.write_text('[\n  {"instruction": "i", "output": "o"},\n  {"instruction": "i", "output": }\n]\n')
    with pytest.raises(LingError, match=r"a\.json:3: invalid JSON"):
        read_examples(path)


def test_unusable_files_and_labels(tmp_path):
    with pytest.raises(LingError, match="no such data file"):
        read_examples(tmp_path / "missing.jsonl")
    with pytest.raises(LingError, match="is a directory"):
        read_examples(tmp_path)
    empty = write(tmp_path / "e.jsonl", [""])
    with pytest.raises(LingError, match="no usable records"):
        read_examples(empty)
    bad = write(tmp_path / "bad.jsonl", ["{x"])
    with pytest.raises(LingError, match="no usable records; 1 bad record.*invalid JSON"):
        read_examples(bad, skip_bad_records=True)
    labelled = write(tmp_path / "c.jsonl", [{"text": "good", "label": [1]}])
    with pytest.raises(LingError, match=r"c\.jsonl:1: label 'label' must be a string or an integer, got list"):
        read_examples(labelled, label_field="label")
    with pytest.raises(LingError, match=r"c\.jsonl:1: missing label field 'y'"):
        read_examples(labelled, label_field="y")


# ---- templates and loss masks -------------------------------------------------------------
def test_builtin_chatml_adds_tokens_and_becomes_the_template():
    tok = Tokenizer.train_char(["ab"])
    before = tok.vocab_size
    new_ids = install_chatml(tok)
    assert new_ids == [before, before + 1]
    assert [tok.id_to_token(i) for i in new_ids] == [IM_START, IM_END]
    assert tok.chat_template == CHATML_TEMPLATE and tok.eos_id == new_ids[1]
    assert tok.encode("a<|im_end|>b") == [tok.token_to_id("a"), new_ids[1], tok.token_to_id("b")]


def test_multi_turn_mask_token_by_token(char_tokenizer):
    tok = char_tokenizer
    encoded = encode_example(Example("x", messages=CHAT), tok, max_seq_len=1000)
    shown = [tok.id_to_token(t) for t in encoded.tokens]
    text = "".join(shown)
    assert text == ("<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n"
                    "<|im_start|>assistant\nok<|im_end|>\n")
    # Label at position i is token i+1 where that token is the assistant's, else -100.
    expected = [IGNORE] * len(shown)
    header = [IM_START, *"assistant\n"]
    starts = [i + len(header) for i in range(len(shown)) if shown[i:i + len(header)] == header]
    assert ["".join(shown[s:s + 3]) for s in starts] == ["yo" + IM_END, "ok" + IM_END]
    for start in starts:  # each reply and its <|im_end|> are learned, nothing else
        for j in range(start, start + 3):
            expected[j - 1] = encoded.tokens[j]
    assert encoded.labels == expected
    assert [tok.id_to_token(t) for t in encoded.labels if t != IGNORE] == ["y", "o", IM_END, "o", "k", IM_END]
    everything = encode_example(Example("x", messages=CHAT), tok, 1000, train_on_prompt=True)
    assert everything.labels == encoded.tokens[1:] + [IGNORE]


LLAMA3_LIKE = (
    "{{- bos_token }}{% for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def test_template_without_generation_blocks_masks_by_prefix_diff():
    tok = Tokenizer.train_bpe(["hello world, be kind and say ok " * 20], vocab_size=300,
                              special_tokens=["<|bos|>", "<|eos|>", "<|pad|>", "<|start_header_id|>",
                                              "<|end_header_id|>", "<|eot_id|>"])
    tok.chat_template = LLAMA3_LIKE
    encoded = encode_example(Example("x", messages=CHAT), tok, 1000)
    trained = [t for t in encoded.labels if t != IGNORE]
    assert tok.decode(trained) == "yo<|eot_id|>ok<|eot_id|>"
    assert encoded.tokens[0] == tok.token_to_id("<|bos|>")  # the template's BOS, not doubled


def test_text_examples_train_every_token_and_truncation_is_flagged(char_tokenizer):
    tok = char_tokenizer
    example = Example("x", text="abc")
    encoded = encode_example(example, tok, 100)
    assert encoded.tokens == tok.encode("abc") + [tok.eos_id]
    assert encoded.labels == encoded.tokens[1:] + [IGNORE]
    assert not encoded.truncated
    cut = encode_example(example, tok, 2)
    assert cut.truncated and cut.tokens == encoded.tokens[:2] and cut.labels == encoded.labels[:2]


# ---- packing ------------------------------------------------------------------------------
def _encoded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        tokens = torch.randint(0, 64, (n,), generator=g).tolist()
        out.append(Encoded(tokens, tokens[1:] + [IGNORE]))
    return out


def test_pack_and_collate_layout():
    examples = _encoded([3, 4, 5, 2])
    rows = pack_examples(examples, seq_len=8)
    assert [[len(e.tokens) for e in row] for row in rows] == [[3, 4], [5, 2]]
    batch = collate(rows, pad_id=0, packed=True)
    assert batch.positions.tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1]]
    mask = batch.mask[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False]  # 2nd example sees only itself
    unpacked = collate([[e] for e in examples], pad_id=0, packed=False)
    assert unpacked.positions is None and unpacked.mask is None and unpacked.tokens.shape == (4, 5)
    assert unpacked.labels[3].tolist() == examples[3].labels + [IGNORE] * 3


def test_packing_isolates_examples_and_restarts_positions():
    for preset in ("tiny", "shakespeare-char"):  # RoPE and learned positions
        model = build_model(ModelConfig.from_name(preset, dropout=0.0)).eval()
        examples = _encoded([5, 7, 4])
        batch = collate(pack_examples(examples, 16), pad_id=0, packed=True)
        changed = list(examples)
        changed[1] = _encoded([6], seed=5)[0]
        batch2 = collate(pack_examples(changed, 16), pad_id=0, packed=True)
        with torch.no_grad():
            a = model(batch.tokens, batch.positions, batch.mask)
            b = model(batch2.tokens, batch2.positions, batch2.mask)
            alone = model(torch.tensor([examples[2].tokens]))
        torch.testing.assert_close(a[:, :5], b[:, :5])
        torch.testing.assert_close(a[:, 12:16], b[:, 11:15])
        torch.testing.assert_close(a[:, 12:16], alone)


def test_sft_batches_are_seeded_and_resumable():
    examples = _encoded([3] * 10)
    batches = SFTBatches(examples, micro_batch=3, pad_id=0, seed=1)
    first = [b.tokens for _ in range(5) for b in batches.next_step()]  # crosses an epoch boundary
    resumed = SFTBatches(examples, micro_batch=3, pad_id=0, seed=1)
    for _ in range(2):
        resumed.next_step()
    again = SFTBatches(examples, micro_batch=3, pad_id=0, seed=1)
    again.load_state_dict(resumed.state_dict())
    for expected in first[2:]:
        assert torch.equal(again.next_step()[0].tokens, expected)
    epoch = torch.cat(first[:4])[:10]
    assert sorted(map(tuple, epoch.tolist())) == sorted(tuple(e.tokens) for e in examples)
    # two processes with accumulation 2 split the same four micro-batches of each step
    ranks = [SFTBatches(examples, 3, 0, seed=1, accumulation=2, rank=r, world_size=2) for r in (0, 1)]
    one = SFTBatches(examples, 3, 0, seed=1, accumulation=4)
    for _ in range(3):
        r0, r1 = (r.next_step() for r in ranks)
        assert [b.tokens.tolist() for b in one.next_step()] == [b.tokens.tolist() for b in (r0[0], r1[0], r0[1], r1[1])]


# ---- synthetic tasks ----------------------------------------------------------------------
def test_synthetic_tasks_are_correct_distinct_and_seeded():
    for task in ("reverse", "sort", "add"):
        records = make_examples(task, 200, seed=3)
        assert records == make_examples(task, 200, seed=3)
        assert len({r["input"] for r in records}) == 200
        for r in records:
            if task == "reverse":
                assert r["output"] == r["input"][::-1]
            elif task == "sort":
                assert r["output"] == "".join(sorted(r["input"]))
            else:
                a, b = map(int, r["input"].split(" + "))
                assert int(r["output"]) == a + b
        train, held = held_out_split(records, 20)
        assert not {r["input"] for r in train} & {r["input"] for r in held}
    assert to_messages({"instruction": "Add.", "input": "1 + 2", "output": "3"}) == {
        "messages": [{"role": "user", "content": "Add.\n\n1 + 2"}, {"role": "assistant", "content": "3"}]}
