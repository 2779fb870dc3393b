"""Chat templates render exactly as transformers' apply_chat_template."""

import pytest
from transformers import PreTrainedTokenizerFast

from ling.chat_template import render_chat_with_spans
from ling.errors import LingError
from ling.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_LIKE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are helpful." %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" + system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there 你好 🎉"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok = Tokenizer.train_bpe(["hello world " * 50], vocab_size=280)
    tok.save(path)
    return path


@pytest.mark.parametrize("template", [CHATML, LLAMA3_LIKE], ids=["chatml", "llama3-like"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["single", "system-multiturn"])
def test_rendering_equals_transformers(tokenizer_dir, template, add_generation_prompt, conversation):
    ours = Tokenizer.load(tokenizer_dir)
    ours.chat_template = template
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), bos_token="<|bos|>",
                                 eos_token="<|eos|>", pad_token="<|pad|>")
    hf.chat_template = template
    expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected


def test_generation_blocks_report_assistant_spans():
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}A: {% generation %}{{ m['content'] }}"
                "{% endgeneration %}{{ '\n' }}{% else %}U: {{ m['content'] }}{{ '\n' }}{% endif %}{% endfor %}")
    text, spans = render_chat_with_spans(template, CONVERSATIONS[1][1:])
    assert text == "U: 2+2?\nA: 4\nU: and 3+3?\n"
    assert [text[a:b] for a, b in spans] == ["4"]


def test_template_errors_are_clear():
    with pytest.raises(LingError, match="bad role tool"):
        render_chat_with_spans(LLAMA3_LIKE, [{"role": "tool", "content": "x"}], special_tokens={"bos_token": ""})
    with pytest.raises(LingError, match="line 1"):
        render_chat_with_spans("{% for %}", [])
    with pytest.raises(LingError, match="no chat template"):
        Tokenizer.train_char(["ab"]).apply_chat_template([{"role": "user", "content": "a"}])
