"""Every decoding mode of transformers' own generate(), through a real 3-server swarm, equals local
transformers token for token in float32: ShardedModel is a transformers model whose cache (``cache``,
``past_key_values`` before transformers 5.24) is a RemoteCache standing for the servers' caches.

The tiny random Llama uses SmolLM2's tokenizer (stop strings, streamers and pipeline need a real
one); SmolLM2 itself is checked greedy and with beams on a shared 2-server swarm.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaForCausalLM,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)

from shardnet import ShardedModel
from shardnet.client.remote_cache import RemoteCache
from shardnet.launch import LocalSwarm
from shardnet.models.hf_compat import cache_in

from .conftest import make_llama, noisy_draft, reference

NEW = 12


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, tokenizer):
    path = make_llama(tmp_path_factory.mktemp("tiny_modes"), seed=4, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def draft(tiny_path):
    """The target with noise on its blocks: it agrees with the target on some tokens, not all, so
    assisted decoding both accepts draft tokens and rolls rejected ones back on the servers."""
    return noisy_draft(tiny_path)


@pytest.fixture(scope="module")
def local(tiny_path):
    return reference(tiny_path)


@pytest.fixture(scope="module")
def client(tiny_path, tmp_path_factory):
    swarm = LocalSwarm(
        tiny_path, [(0, 2), (2, 5), (5, 6)], log_dir=tmp_path_factory.mktemp("modes_logs"), torch_threads=1
    )
    swarm.start(timeout_s=180)
    try:
        with ShardedModel.from_pretrained(tiny_path, swarm.initial_peers) as model:
            yield model
    finally:
        swarm.stop()


def _prompts(tokenizer, texts=("The swarm answers", "Hello")) -> dict:
    tokenizer.padding_side = "left"
    return dict(tokenizer(list(texts), return_tensors="pt", padding=True))


def _both(local, client, inputs, **kwargs):
    torch.manual_seed(0)
    want = local.generate(**inputs, max_new_tokens=NEW, **kwargs)
    torch.manual_seed(0)
    got = client.generate(**inputs, max_new_tokens=NEW, **kwargs)
    return want, got


def test_is_a_transformers_model_with_a_remote_cache(client, tokenizer):
    from transformers import GenerationMixin, PreTrainedModel

    assert isinstance(client, PreTrainedModel) and isinstance(client, GenerationMixin)
    inputs = _prompts(tokenizer)
    cache = client.new_cache(max_length=32)
    out = client(**inputs, cache=cache)
    assert cache_in(out) is cache and isinstance(cache, RemoteCache)
    seen = inputs["input_ids"].shape[1]
    assert cache.get_seq_length() == seen
    # The name transformers used before 5.24 keeps working, whichever version is installed.
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
    out = client(out.logits[:, -1].argmax(-1, keepdim=True), attention_mask=mask, past_key_values=cache)
    assert cache_in(out) is cache and cache.get_seq_length() == seen + 1
    with pytest.raises(TypeError, match="not both"):
        client(inputs["input_ids"][:, -1:], cache=cache, past_key_values=cache)
    cache.close()


def test_a_misspelled_generate_argument_is_refused_as_transformers_does(client, tokenizer):
    with pytest.raises(ValueError, match="max_new_token"):
        client.generate(**_prompts(tokenizer), max_new_token=3)


MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.9),
    "min_p_repetition_penalty": dict(do_sample=True, min_p=0.05, repetition_penalty=1.3),
    "min_new_tokens": dict(do_sample=False, min_new_tokens=NEW, eos_token_id=[2, 5, 7]),
    "num_return_sequences": dict(do_sample=True, num_return_sequences=3, top_k=20),
    "beam_search": dict(num_beams=4),
    "beams_returning_several": dict(num_beams=4, num_return_sequences=2, length_penalty=0.5),
    "beam_sampling": dict(num_beams=3, do_sample=True, top_k=30),
    "no_repeat_ngram_size": dict(do_sample=False, no_repeat_ngram_size=2),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_decoding_mode_matches_local_with_left_padding(client, local, tokenizer, mode):
    want, got = _both(local, client, _prompts(tokenizer), **MODES[mode])
    assert got.tolist() == want.tolist()


def test_return_dict_with_scores_and_logits_matches(client, local, tokenizer):
    inputs = _prompts(tokenizer)
    extra = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True)
    want, got = _both(local, client, inputs, **extra)
    assert got.sequences.tolist() == want.sequences.tolist()
    assert len(got.scores) == len(want.scores) == NEW
    for mine, theirs in zip(got.scores + got.logits, want.scores + want.logits, strict=True):
        finite = torch.isfinite(theirs)
        assert torch.equal(finite, torch.isfinite(mine))
        assert (mine[finite] - theirs[finite]).abs().max().item() <= 1e-4
    cache_in(got).close()  # returned with the output: it is the caller's to close (or drop)


def test_beam_search_scores_match(client, local, tokenizer):
    extra = dict(num_beams=3, return_dict_in_generate=True, output_scores=True)
    want, got = _both(local, client, _prompts(tokenizer), **extra)
    assert got.sequences.tolist() == want.sequences.tolist()
    assert torch.allclose(got.sequences_scores, want.sequences_scores, atol=1e-4)


def test_stop_strings_stop_where_local_stops(client, local, tokenizer):
    inputs = _prompts(tokenizer, ["Once upon"])
    free = local.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    new_text = tokenizer.decode(free[0, inputs["input_ids"].shape[1] :])
    stop = tokenizer.decode(free[0, inputs["input_ids"].shape[1] + 4])  # the 5th new token's text
    assert stop and stop in new_text
    want, got = _both(local, client, inputs, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    assert got.tolist() == want.tolist()
    assert got.shape[1] < free.shape[1]  # it did stop early


def test_text_streamer_prints_the_local_text(client, local, tokenizer, capsys):
    inputs = _prompts(tokenizer, ["Streaming works"])
    want = local.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    client.generate(
        **inputs, max_new_tokens=NEW, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True)
    )
    expected = tokenizer.decode(want[0, inputs["input_ids"].shape[1] :])
    assert capsys.readouterr().out.strip() == expected.strip()


def test_text_iterator_streamer_yields_the_local_text(client, local, tokenizer):
    inputs = _prompts(tokenizer, ["Iterate over"])
    want = local.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=120)
    worker = threading.Thread(
        target=client.generate, kwargs=dict(**inputs, max_new_tokens=NEW, do_sample=False, streamer=streamer)
    )
    worker.start()
    text = "".join(streamer)
    worker.join(timeout=120)
    assert text == tokenizer.decode(want[0, inputs["input_ids"].shape[1] :])


def test_assisted_decoding_accepts_and_rolls_back_exactly(client, local, draft, tokenizer):
    inputs = _prompts(tokenizer, ["Draft tokens"])
    want = local.generate(**inputs, max_new_tokens=2 * NEW, do_sample=False)
    crops = []  # one per verification step of the target: how many draft positions it rolled back
    original_crop = RemoteCache.crop

    def counting_crop(self, tokens_to_remove):
        crops.append(tokens_to_remove)
        original_crop(self, tokens_to_remove)

    RemoteCache.crop = counting_crop
    try:
        got = client.generate(**inputs, max_new_tokens=2 * NEW, do_sample=False, assistant_model=draft)
    finally:
        RemoteCache.crop = original_crop
    assert got.tolist() == want.tolist()
    assert any(n < 0 for n in crops)  # some draft tokens were rejected and rolled back on the servers
    assert len(crops) < 2 * NEW  # and some were accepted: fewer target steps than tokens


def test_assisted_sampling_matches_local(client, local, draft, tokenizer):
    inputs = _prompts(tokenizer, ["Sampled drafts"])
    torch.manual_seed(3)
    want = local.generate(**inputs, max_new_tokens=NEW, do_sample=True, top_k=20, assistant_model=draft)
    torch.manual_seed(3)
    got = client.generate(**inputs, max_new_tokens=NEW, do_sample=True, top_k=20, assistant_model=draft)
    assert got.tolist() == want.tolist()


def test_text_generation_pipeline(client, local, tokenizer):
    here = pipeline("text-generation", model=client, tokenizer=tokenizer)
    there = pipeline("text-generation", model=local, tokenizer=tokenizer)
    prompts = ["A pipeline", "runs the swarm"]
    got = here(prompts, max_new_tokens=NEW, do_sample=False)
    want = there(prompts, max_new_tokens=NEW, do_sample=False)
    assert got == want and got[0][0]["generated_text"].startswith("A pipeline")


def test_inputs_embeds_and_labels_match(client, local, tokenizer):
    inputs = _prompts(tokenizer)
    embeds = local.get_input_embeddings()(inputs["input_ids"]).detach()
    with torch.no_grad():
        want = local(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["input_ids"]
        )
    got = client(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["input_ids"])
    assert (got.logits - want.logits).abs().max().item() <= 1e-4
    assert abs(got.loss.item() - want.loss.item()) <= 1e-4


def test_session_continues_after_beam_search(client, local, tokenizer):
    """Beam search leaves the cache in beam order; the next call in the session resends the history."""
    first_ids = _prompts(tokenizer, ["First turn"])["input_ids"]
    more = _prompts(tokenizer, [" and more"])["input_ids"]
    with client.inference_session(max_length=64):
        first = client.generate(first_ids, max_new_tokens=6, num_beams=3)
        second = client.generate(more, max_new_tokens=6, do_sample=False)
    want_first = local.generate(first_ids, max_new_tokens=6, num_beams=3)
    assert first.tolist() == want_first.tolist()
    joined = torch.cat([want_first, more], dim=1)
    want_second = local.generate(
        joined, attention_mask=torch.ones_like(joined), max_new_tokens=6, do_sample=False
    )
    assert second.tolist() == want_second[:, want_first.shape[1] :].tolist()


# ---- the real SmolLM2, on the 2-server swarm the API and chat tests share ----


@pytest.fixture(scope="module")
def smollm2(smollm2_path, smollm2_swarm):
    local_model = LlamaForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    with ShardedModel.from_pretrained(smollm2_path, smollm2_swarm.initial_peers) as model:
        yield model, local_model


@pytest.mark.parametrize("mode", ["greedy", "beam_search"])
def test_smollm2_matches_local(smollm2, tokenizer, mode):
    model, local_model = smollm2
    messages = [{"role": "user", "content": "What is a volunteer computing swarm?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    kwargs = dict(max_new_tokens=16, do_sample=False, num_beams=1 if mode == "greedy" else 3)
    want = local_model.generate(**inputs, **kwargs)
    got = model.generate(**inputs, **kwargs)
    assert got.tolist() == want.tolist()


def test_smollm2_chat_pipeline_matches_local(smollm2, tokenizer):
    """The README's example: a chat-templated text-generation pipeline over the swarm."""
    model, local_model = smollm2
    messages = [{"role": "user", "content": "How does a rainbow form?"}]
    got = pipeline("text-generation", model=model, tokenizer=tokenizer)(
        messages, max_new_tokens=12, do_sample=False
    )
    want = pipeline("text-generation", model=local_model, tokenizer=tokenizer)(
        messages, max_new_tokens=12, do_sample=False
    )
    assert got == want and got[0]["generated_text"][-1]["role"] == "assistant"
