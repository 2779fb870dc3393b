"""The inference engine: batching, continuous batching, seeds, stops, streaming, context, speculation."""

import copy

import pytest
import torch

from ling.checkpoint import save_model_dir
from ling.config import ModelConfig
from ling.errors import LingError
from ling.infer.engine import Engine
from ling.infer.sampling import SamplingParams
from ling.model import build_model
from tests.scripted import SCRIPT, byte_tokenizer, scripted_model

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
PROMPTS = [[5], list(range(3, 50)), [9, 2, 7, 7, 1]]
"""very different lengths: 1, 47 and 5 tokens"""


def random_model(seed, **overrides):
    """A random tiny model whose greedy output depends on the whole prompt (untied
    embeddings: a tied random model mostly repeats its last input token)."""
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_name("tiny", tie_embeddings=False, **overrides)).eval()


@pytest.fixture(scope="module")
def model():
    return random_model(0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model_dir(model, None, path)
    return path


@pytest.fixture(scope="module")
def scripted():
    """(engine, tokenizer): greedy decoding from 'A' writes SCRIPT[1:], then EOS."""
    tokenizer = byte_tokenizer()
    chain = tokenizer.encode(SCRIPT) + [tokenizer.eos_id]
    return Engine(scripted_model(tokenizer, chain), tokenizer, max_batch_size=2), tokenizer


def greedy_without_cache(model, prompt, n):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_each_prompt_in_a_batch_gets_its_greedy_output_alone(model, ckpt):
    expected = [greedy_without_cache(model, p, GREEDY.max_new_tokens) for p in PROMPTS]
    assert greedy_without_cache(model, [0] + PROMPTS[1][1:], GREEDY.max_new_tokens) != expected[1]  # the cache matters
    # The engine on the live model, and on the checkpoint (weights prepacked for oneDNN).
    for engine in (Engine(model, max_batch_size=3), Engine(ckpt, max_batch_size=3)):
        batch = engine.generate(PROMPTS, GREEDY)
        assert [c.token_ids for c in batch] == expected
        assert [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS] == expected
        assert [c.prompt_tokens for c in batch] == [1, 47, 5]


def test_requests_join_and_leave_a_running_batch(model):
    expected = [greedy_without_cache(model, p, 6) for p in PROMPTS]
    engine = Engine(model, max_batch_size=2)
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (3, 6, 6)]
    first = engine.add_request(PROMPTS[0], params[0])
    second = engine.add_request(PROMPTS[1], params[1])
    outputs = {first: [], second: []}
    finished = {}
    for step in range(20):
        if step == 2:  # the batch is full: this one waits for the first request's slot
            third = engine.add_request(PROMPTS[2], params[2])
            outputs[third] = []
        for delta in engine.step():
            outputs[delta.request_id] += delta.token_ids
            if delta.finish_reason:
                finished[delta.request_id] = step
        assert engine.num_running() <= 2
    assert [outputs[i] for i in (first, second, third)] == [expected[0][:3], expected[1], expected[2]]
    assert finished[first] < finished[third] and not engine.has_work()


def test_same_seed_same_text_in_any_batch_and_different_seed_differs(model):
    engine = Engine(model, max_batch_size=4)
    params = SamplingParams(temperature=1.0, max_new_tokens=20, seed=123, ignore_eos=True)
    alone = engine.generate([PROMPTS[2]], params)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_new_tokens=20, seed=s, ignore_eos=True) for s in (1, 2)]
    in_batch = engine.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [others[0], params, others[1]])
    assert in_batch[1].token_ids == alone
    different = engine.generate([PROMPTS[2]], SamplingParams(temperature=1.0, max_new_tokens=20, seed=124, ignore_eos=True))
    assert different[0].token_ids != alone


def test_top_k_one_equals_greedy(model):
    engine = Engine(model, max_batch_size=3)
    top1 = SamplingParams(temperature=1.5, top_k=1, max_new_tokens=12, ignore_eos=True)
    assert [c.token_ids for c in engine.generate(PROMPTS, top1)] == [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]


def test_max_new_tokens_and_stop_token_ids(model):
    engine = Engine(model)
    greedy = engine.generate([PROMPTS[2]], GREEDY)[0]
    assert len(greedy.token_ids) == 12 and greedy.finish_reason == "length"
    stop_id = greedy.token_ids[4]
    stopped = engine.generate([PROMPTS[2]], SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[stop_id]))[0]
    assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(stop_id) + 1]
    assert stopped.finish_reason == "stop"


def test_scripted_model_writes_its_script_and_stops_at_eos(scripted):
    engine, _ = scripted
    completion = engine.generate(["A"], SamplingParams(temperature=0, max_new_tokens=50))[0]
    assert completion.text == SCRIPT[1:]
    assert completion.finish_reason == "stop"  # EOS: a stop token, not part of the text


def test_streaming_never_emits_half_a_character(scripted):
    engine, tokenizer = scripted
    deltas = [d for _, d in engine.stream(["A"], SamplingParams(temperature=0, max_new_tokens=50))]
    texts = [d.text for d in deltas]
    assert "".join(texts) == SCRIPT[1:]
    assert not any("\ufffd" in t for t in texts)
    # 世, 界 (3 bytes), 🎉 (4) and é (2) each come out whole, after their last byte.
    assert [t for t in texts if t] == ["b", "世", "界", "🎉", "é", " ", "X", "Y", "Z"]
    assert len(deltas) == len(tokenizer.encode(SCRIPT[1:])) + 1


def test_a_stop_string_truncates_and_never_streams(scripted):
    engine, _ = scripted
    params = SamplingParams(temperature=0, max_new_tokens=50, stop=["🎉é X"])
    texts = [d.text for _, d in engine.stream(["A"], params)]
    assert "".join(texts) == "b世界"
    assert not any("🎉" in t for t in texts)
    completion = engine.generate(["A"], params)[0]
    assert (completion.text, completion.finish_reason) == ("b世界", "stop")
    # A string that only starts like a stop string is released once it cannot be one.
    assert engine.generate(["A"], SamplingParams(temperature=0, max_new_tokens=50, stop=["XYQ"]))[0].text == SCRIPT[1:]


def test_logprobs_are_the_models_log_softmax(model):
    engine = Engine(model)
    params = SamplingParams(temperature=0, max_new_tokens=3, logprobs=True, top_logprobs=2, ignore_eos=True)
    completion = engine.generate([PROMPTS[2]], params)[0]
    tokens = PROMPTS[2] + completion.token_ids
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0].log_softmax(-1)
    for i, record in enumerate(completion.logprobs):
        row = expected[len(PROMPTS[2]) - 1 + i]
        assert record.token_id == completion.token_ids[i]
        assert record.logprob == pytest.approx(row[record.token_id].item(), abs=1e-4)
        assert [t for t, _ in record.top] == row.topk(2).indices.tolist()  # greedy: the top one is the token


def test_a_prompt_that_fills_the_context_is_a_clear_error(model):
    engine = Engine(model)
    with pytest.raises(LingError, match="the prompt is 64 tokens but the context holds 64"):
        engine.generate([list(range(64))], GREEDY)
    with pytest.raises(LingError, match="empty"):
        engine.generate([[]], GREEDY)


def test_without_slide_generation_stops_when_the_context_is_full(model):
    engine = Engine(model, max_batch_size=2)
    long = SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True, slide=False)
    near_end, short = engine.generate([list(range(60)), [1, 2]], long)
    assert (len(near_end.token_ids), near_end.finish_reason) == (4, "length")  # context_length 64
    assert len(short.token_ids) == 62
    assert near_end.slides == short.slides == 0


def greedy_in_sliding_windows(model, prompt, n, context, keep):
    """Greedy tokens, each predicted by a fresh forward (no cache) on the window the engine
    should be in: the window restarts at the most recent `keep` tokens whenever it is full."""
    tokens, start = list(prompt), 0
    with torch.no_grad():
        for _ in range(n):
            if len(tokens) - start > context:  # the row is full and one more token is waiting
                start = len(tokens) - keep
            tokens.append(int(model(torch.tensor([tokens[start:]]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_generation_slides_past_the_context_as_a_fresh_forward_on_the_cropped_window(model):
    engine = Engine(model, max_batch_size=2)
    assert (engine.max_len, engine.slide_keep) == (64, 48)
    params = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
    prompts = [[5], list(range(3, 50))]
    completions = engine.generate(prompts, params)
    for prompt, completion in zip(prompts, completions):
        assert (len(completion.token_ids), completion.finish_reason) == (200, "length")
        assert completion.token_ids == greedy_in_sliding_windows(model, prompt, 200, 64, 48)
    # a slide before the token that would be the 65th in the row, then every 17 tokens (48 kept + 16 decoded + 1)
    assert [c.slides for c in completions] == [(len(p) + 199 - 65) // 17 + 1 for p in prompts] == [8, 11]
    # a sampled request slides too, and its seed still fixes its text
    sampled = SamplingParams(temperature=1.0, max_new_tokens=100, ignore_eos=True, seed=3)
    once, twice = engine.generate([[5], [5]], sampled)
    assert len(once.token_ids) == 100 and once.token_ids == twice.token_ids and once.slides == 3


def test_abort_frees_the_slot(model):
    engine = Engine(model, max_batch_size=1)
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort(rid)
    assert [d.finish_reason for d in engine.step()] == ["abort"]
    assert engine.num_running() == 0 and not engine.has_work()


def test_leaving_a_stream_early_aborts_its_requests(model):
    engine = Engine(model, max_batch_size=2)
    for _, delta in engine.stream(PROMPTS[:2], SamplingParams(max_new_tokens=30, ignore_eos=True)):
        break
    assert not engine.has_work()


@pytest.mark.parametrize("draft_seed", [None, 1], ids=["draft-is-the-model", "different-draft"])
def test_speculative_decoding_equals_plain_greedy(model, draft_seed):
    draft = model if draft_seed is None else random_model(draft_seed, n_layer=1)
    plain = Engine(model, max_batch_size=3)
    speculative = Engine(model, max_batch_size=3, draft=Engine(draft, max_batch_size=3), num_speculative_tokens=3)
    prompts = PROMPTS + [list(range(2, 60))]  # the last one runs into the context limit mid-proposal
    for slide in (False, True):  # stopping at the context, or sliding at the same token as plain decoding
        params = SamplingParams(temperature=0, max_new_tokens=20 if not slide else 70, ignore_eos=True, slide=slide)
        expected = plain.generate(prompts, params)
        assert [c.token_ids for c in speculative.generate(prompts, params)] == [c.token_ids for c in expected]
        assert [len(c.token_ids) for c in expected] == ([20, 17, 20, 6] if not slide else [70] * 4)
    accepted, proposed = speculative.speculation["accepted"], speculative.speculation["proposed"]
    assert (accepted == proposed) if draft_seed is None else (0 <= accepted < proposed)
    with pytest.raises(LingError, match="greedy"):
        speculative.generate([[1]], SamplingParams(temperature=1.0))


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens_and_compiles_only_in_warm_up(model):
    from torch._dynamo.utils import counters

    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    compiled = Engine(model, max_batch_size=2, compile=True)
    compiled.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # one row, several rows
    eager = Engine(model, max_batch_size=2)
    for prompts in (PROMPTS[:1], PROMPTS[:2]):
        assert [c.token_ids for c in compiled.generate(prompts, params)] == \
            [c.token_ids for c in eager.generate(prompts, params)]
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation after warm_up
    # Another engine in the same process, on the model in another dtype, gets its own graph.
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert [c.token_ids for c in Engine(bf16, max_batch_size=2, compile=True).generate(PROMPTS[:2], params)] == \
        [c.token_ids for c in Engine(bf16, max_batch_size=2).generate(PROMPTS[:2], params)]


def test_warm_up_leaves_the_engine_idle_and_unchanged(model):
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    warmed = Engine(model, max_batch_size=2)
    warmed.warm_up()
    assert not warmed.has_work()
    assert [c.token_ids for c in warmed.generate(PROMPTS[:2], params)] == \
        [c.token_ids for c in Engine(model, max_batch_size=2).generate(PROMPTS[:2], params)]


def test_how_the_decode_step_compiles_depends_on_the_device():
    from ling.kernels.compile_decision import how_to_compile

    cuda = how_to_compile(torch.device("cuda"))  # CUDA graphs: one static shape
    assert cuda.options == {"mode": "reduce-overhead", "dynamic": False} and cuda.static_shapes and not cuda.inductor
    cpu = how_to_compile(torch.device("cpu"))  # as before: dynamic shapes, frozen weights, C++ wrapper
    assert cpu.options == {"dynamic": True} and not cpu.static_shapes
    assert cpu.inductor == {"freezing": True, "cpp_wrapper": True, "cpp.enable_concat_linear": True}


def test_static_shape_decoding_the_cuda_graph_path_gives_the_same_tokens_with_one_graph(model, monkeypatch):
    """The CUDA path decodes every row over every cache slot, so that one captured graph
    serves every step. Here it runs on CPU with dynamo's eager backend (no CUDA graph): the
    same tokens as the plain engine while requests join and leave, and a single graph."""
    from torch._dynamo.utils import counters

    from ling.kernels import compile_decision

    monkeypatch.setattr(compile_decision, "how_to_compile", lambda device: compile_decision.CompilePlan(
        {"backend": "eager", "dynamic": False}, static_shapes=True))
    torch._dynamo.reset()
    counters.clear()
    static = Engine(model, max_batch_size=3, compile=True)
    static.warm_up()
    assert counters["stats"]["unique_graphs"] == 1  # one row and two rows: the same shape
    plain = Engine(model, max_batch_size=3)
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (3, 9, 6)]
    for prompts in (PROMPTS[:1], PROMPTS, PROMPTS[1:]):  # the first request leaves early: a free row
        assert [c.token_ids for c in static.generate(prompts, params[:len(prompts)])] == \
            [c.token_ids for c in plain.generate(prompts, params[:len(prompts)])]
    assert counters["stats"]["unique_graphs"] == 1
