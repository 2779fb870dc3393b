"""Hugging Face tokenizer directories load in ling with exactly AutoTokenizer's ids and chat prompts.

The tokenizers are built here (no downloads) the way the hub families' are — a Llama-3-like
byte-level BPE whose post-processor adds BOS, a GPT-2-like one, Qwen-like ones with added
special tokens, a Llama-2/Mistral-like SentencePiece BPE with byte fallback — and saved as
transformers saves them (both the transformers 5 layout, chat_template.jinja beside the
config, and the hub's transformers 4 layout, the template inside tokenizer_config.json).
The chat templates are realistic: system prompts, tools, tool calls, reasoning, `namespace`,
`raise_exception`, whitespace control.
"""

import json

import pytest
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoTokenizer, GPT2Tokenizer, LlamaTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

from ling.errors import LingError
from ling.tokenizer import Tokenizer

CORPUS = [
    "Hello world, this is a test of the tokenizer. The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好。我们去公园散步吧。 emoji 🎉🚀 👨‍👩‍👧 café naïve",
    "def f(x):\n    return x  +  1\n\n\n\tindented\ttabs   and   runs 123456 3.14159",
] * 20
TEXTS = [
    "",
    "Hello world",
    "   leading spaces, trailing   ",
    "runs    of     spaces\n\n\n\ttabs\t\tand\r\nnewlines",
    "你好，世界！这是一个测试。",
    "emoji 🎉🚀 and a family 👨‍👩‍👧‍👦 and flags 🇯🇵",
    "numbers 1234567 3.14159 and code: def f(x): return x+1",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<s>[INST] hi [/INST] hello</s>",
]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# ---- realistic chat templates ------------------------------------------------------------
LLAMA31_STYLE = """{{- bos_token }}
{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, respond with a JSON function call.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}' }}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping %}{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

QWEN25_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nReturn each call as JSON inside <tool_call></tool_call> tags.<|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

QWEN3_STYLE = """{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

MISTRAL_STYLE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- endif %}
{%- endfor %}
"""

ZEPHYR_STYLE = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""


# ---- tokenizer builders ----------------------------------------------------------------------
def byte_level_bpe(specials: list[str], split: str | None = None, nfc: bool = False) -> RawTokenizer:
    tok = RawTokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tok.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def vocab_and_merges(tok: RawTokenizer):
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def llama3_like(directory):
    """Byte-level BPE, a TemplateProcessing post-processor adding BOS; saved by transformers 5."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = byte_level_bpe(specials, split=LLAMA3_SPLIT)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            chat_template=LLAMA31_STYLE).save_pretrained(directory)


def gpt2_like(directory):
    vocab, merges = vocab_and_merges(byte_level_bpe(["<|endoftext|>"]))
    GPT2Tokenizer(vocab=vocab, merges=merges, chat_template=ZEPHYR_STYLE).save_pretrained(directory)


def qwen3_like(directory):
    """Qwen's NFC + split regex + byte level, added special tokens; saved by transformers 5."""
    vocab, merges = vocab_and_merges(byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN_SPLIT, True))
    Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                   additional_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                   chat_template=QWEN3_STYLE).save_pretrained(directory)


def qwen25_hub_layout(directory):
    """The same kind of tokenizer, written as the hub's Qwen2.5 files are (transformers 4 layout)."""
    tok = byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN_SPLIT, nfc=True)
    tok.add_special_tokens(["<tool_call>", "</tool_call>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True}
             for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]}
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
              "chat_template": QWEN25_STYLE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
              "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
              "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def mistral_like(directory):
    """SentencePiece-style BPE with byte fallback (Llama 2, Mistral, TinyLlama); BOS added."""
    tok = RawTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False))
    vocab, merges = vocab_and_merges(tok)
    LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, chat_template=MISTRAL_STYLE).save_pretrained(directory)


BUILDERS = {"llama3": llama3_like, "gpt2": gpt2_like, "qwen3": qwen3_like, "qwen2.5-hub-layout": qwen25_hub_layout,
            "mistral": mistral_like}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, tmp_path_factory):
    """(AutoTokenizer, ling Tokenizer) loaded from the same directory."""
    directory = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](directory)
    return request.param, AutoTokenizer.from_pretrained(directory), Tokenizer.load(directory)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_equal_autotokenizer(pair, add_special_tokens):
    _, hf, ours = pair
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=add_special_tokens) == \
            hf(text, add_special_tokens=add_special_tokens)["input_ids"], text
    assert ours.encode_batch(TEXTS, add_special_tokens) == hf(TEXTS, add_special_tokens=add_special_tokens)["input_ids"]


def test_special_tokens_and_bos_equal_autotokenizer(pair):
    name, hf, ours = pair
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.vocab_size == len(hf)
    adds_bos = name in ("llama3", "mistral")
    assert (ours.encode("hi")[0] == ours.bos_id) is adds_bos


CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi there 你好 🎉"}],
    "system-multiturn": [{"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    "multiturn": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "Another?"}],
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather at a place",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "22°C, sunny"},
    {"role": "user", "content": "Thanks!"},
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_chat_template_renders_as_apply_chat_template(pair, conversation, add_generation_prompt):
    _, hf, ours = pair
    messages = CONVERSATIONS[conversation]
    kwargs = {"date_string": "26 Jul 2024"}
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs) == expected


@pytest.mark.parametrize("name, kwargs, messages", [
    ("qwen2.5-hub-layout", {"tools": [WEATHER_TOOL]}, TOOL_CONVERSATION),
    ("llama3", {"tools": [WEATHER_TOOL], "date_string": "26 Jul 2024"}, TOOL_CONVERSATION),
    ("qwen3", {"enable_thinking": False}, CONVERSATIONS["multiturn"]),
    ("qwen3", {}, [{"role": "user", "content": "Why?"},
                   {"role": "assistant", "content": "Because.", "reasoning": "The user asks why; be brief."}]),
    ("qwen3", {}, [{"role": "user", "content": "Why?"},
                   {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nBecause."},
                   {"role": "user", "content": "Sure?"}]),
], ids=["qwen2.5-tools", "llama3.1-tools", "qwen3-no-thinking", "qwen3-reasoning-field", "qwen3-think-in-content"])
def test_tools_and_reasoning_render_as_apply_chat_template(tmp_path, name, kwargs, messages):
    BUILDERS[name](tmp_path)
    hf, ours = AutoTokenizer.from_pretrained(tmp_path), Tokenizer.load(tmp_path)
    for add_generation_prompt in (False, True):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                          **kwargs)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs) == expected


def test_template_exceptions_are_clear_errors(tmp_path):
    mistral_like(tmp_path)
    with pytest.raises(LingError, match="Conversation roles must alternate"):
        Tokenizer.load(tmp_path).apply_chat_template([{"role": "assistant", "content": "first"}])


def test_saved_tokenizer_keeps_template_and_ids(tmp_path):
    """What ling writes back (one tokenizer_config.json with the template inside) loads identically."""
    qwen3_like(tmp_path / "hf")
    ours = Tokenizer.load(tmp_path / "hf")
    ours.save(tmp_path / "again")
    assert not (tmp_path / "again" / "chat_template.jinja").exists()
    again, hf = Tokenizer.load(tmp_path / "again"), AutoTokenizer.from_pretrained(tmp_path / "again")
    assert again.chat_template == QWEN3_STYLE
    messages = CONVERSATIONS["system-multiturn"]
    assert hf.apply_chat_template(messages, tokenize=False) == again.apply_chat_template(messages)
    assert [hf(t)["input_ids"] for t in TEXTS] == [again.encode(t) for t in TEXTS]
