"""Backward through remote blocks (issue 22): ``loss.backward()`` through a real swarm gives the local
transformers model's gradients, with respect to the inputs' embeddings and to every client-side
parameter; a server that fails its backward is replaced; bad requests get typed errors."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys

import grpc
import pytest
import torch

from shardnet import ShardedModel
from shardnet.client.prompt_tuning import PromptTuning
from shardnet.errors import GenerationError
from shardnet.wire import pb, pb_grpc
from shardnet.wire.tensors import serialize
from tests.conftest import prompt, reference, running_swarm, serving_process

# Two holders of each span, each running its backward one row at a time (chunks of at most 16 positions).
SPANS = [(0, 3), (0, 3), (3, 6), (3, 6)]


@pytest.fixture(scope="module")
def training_swarm(llama_untied, tmp_path_factory):
    yield from running_swarm(
        llama_untied, SPANS, tmp_path_factory.mktemp("training"), extra_args=["--max-chunk-tokens", "16"]
    )


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within 1e-4 of the gradient's largest value (the issue's target)."""
    return float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def local_and_remote_loss(model, local, ids, mask, embeds=False):
    labels = ids.masked_fill(mask == 0, -100) if mask is not None else ids
    results = []
    for which in (model, local):
        if embeds:
            inputs = which.get_input_embeddings()(ids).detach().requires_grad_(True)
            out = which(inputs_embeds=inputs, attention_mask=mask, labels=labels)
        else:
            inputs = None
            out = which(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(), inputs))
    return results


def test_gradients_equal_local_transformers(training_swarm, llama_untied):
    local = reference(llama_untied)
    with ShardedModel.from_pretrained(llama_untied, training_swarm.initial_peers, verify_fraction=0) as model:
        ids, mask = prompt(3, seed=4)
        (loss, embeds), (local_loss, local_embeds) = local_and_remote_loss(
            model, local, ids, mask, embeds=True
        )
        assert torch.allclose(loss, local_loss, atol=1e-5)
        assert close(embeds.grad, local_embeds.grad)
        assert len(model.last_route) >= 2  # through at least two servers
        model.zero_grad()
        local.zero_grad()
        local_and_remote_loss(model, local, ids, mask)
        params = dict(local.named_parameters())
        mine = dict(model.head.named_parameters())
        assert mine, "the head has parameters"
        for name, param in mine.items():
            want = params[_local_name(name, params)]
            assert param.grad is not None and close(param.grad, want.grad), name


def _local_name(head_name: str, names) -> str:
    """The local model's name of a head parameter (the head keeps transformers' modules)."""
    for name in names:
        if name.endswith(head_name.split(".", 1)[-1]) and name.split(".")[-2:] == head_name.split(".")[-2:]:
            return name
    raise KeyError(head_name)


def with_deep_prompts(local, deep: torch.Tensor | None) -> list:
    """Forward pre-hooks on the local model's blocks adding block i's prompts to the first positions, as
    the servers do for deep_ptune; returns the hooks to remove."""
    if deep is None:
        return []

    def adder(prompts):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            first = prompts.shape[0]
            hidden = torch.cat([hidden[:, :first] + prompts, hidden[:, first:]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    return [
        layer.register_forward_pre_hook(adder(deep[i]), with_kwargs=True)
        for i, layer in enumerate(local.model.layers)
    ]


def local_prompted_loss(local, prompts: PromptTuning, ids, mask, labels) -> torch.Tensor:
    """The same computation on the local transformers model: prompts before the tokens' embeddings (and
    into every block, deep), the prompts' outputs dropped, transformers' own loss."""
    embeds, full_mask, _ = prompts.prepend(local.get_input_embeddings()(ids), mask, None)
    hooks = with_deep_prompts(local, prompts.deep_prompts(torch.float32))
    try:
        logits = local(inputs_embeds=embeds, attention_mask=full_mask).logits
    finally:
        for hook in hooks:
            hook.remove()
    return local.loss_function(prompts.strip(logits), labels, local.config.vocab_size)


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuning_trains_as_the_local_model_does(training_swarm, llama_untied, mode):
    """12 Adam steps on the swarm and on the local model from the same prompts: the same loss curve."""
    local = reference(llama_untied).requires_grad_(False)
    ids, mask = prompt(2, seed=21)
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(0)
    with ShardedModel.from_pretrained(
        llama_untied, training_swarm.initial_peers, verify_fraction=0, tuning_mode=mode, pre_seq_len=3
    ) as model:
        trainable = [name for name, param in model.named_parameters() if param.requires_grad]
        assert trainable and all(name.startswith("prompts.") for name in trainable)
        mirror = copy.deepcopy(model.prompts)
        if mode == "deep_ptune":  # start the deep prompts away from zero, so they matter from step one
            with torch.no_grad():
                for prompts in (model.prompts, mirror):
                    prompts.intermediate_prompt_embeddings.weight.copy_(
                        0.1 * torch.randn(3, 6 * 64, generator=torch.Generator().manual_seed(1))
                    )
        optimizer = torch.optim.Adam(model.prompts.parameters(), lr=0.05)
        local_optimizer = torch.optim.Adam(mirror.parameters(), lr=0.05)
        curve, local_curve = [], []
        for _ in range(12):
            optimizer.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
            local_optimizer.zero_grad()
            local_loss = local_prompted_loss(local, mirror, ids, mask, labels)
            local_loss.backward()
            local_optimizer.step()
            local_curve.append(local_loss.item())
        with pytest.raises(GenerationError, match="use_cache=False"):  # the caches keep no prompts yet
            model.generate(ids[1:], max_new_tokens=2)
        out = model.generate(ids[1:], max_new_tokens=3, use_cache=False, do_sample=False, eos_token_id=None)
        assert list(out.shape) == [1, ids.shape[1] + 3]
    assert curve[-1] < curve[0] - 0.1, curve  # it learns
    assert max(abs(a - b) for a, b in zip(curve, local_curve, strict=True)) <= 1e-4, (curve, local_curve)


def test_bad_backward_requests_get_typed_errors_and_the_server_keeps_serving(training_swarm):
    port = min(training_swarm.online_ports())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ShardStub(channel)
        info = stub.Info(pb.InfoRequest(), timeout=10)
        hidden = torch.randn(2, 5, info.hidden_size)  # [batch, seq, hidden]
        good = dict(model_id=info.model_id, span=info.span, hidden_states=serialize(hidden))
        nan = hidden.clone()
        nan[0, 1, 2] = float("nan")
        held = f"{info.span.start}:{info.span.end}"
        too_long = torch.zeros(info.span.end - info.span.start, 6, info.hidden_size)  # 6 > seq 5
        cases = [
            (dict(good, grad_outputs=serialize(hidden), update_weights=True), "never changes its weights"),
            (good, "grad_outputs is required"),
            (dict(good, grad_outputs=serialize(hidden[:, :4])), "grad_outputs must match"),
            (dict(good, grad_outputs=serialize(hidden.to(torch.bfloat16))), "grad_outputs must match"),
            (dict(good, grad_outputs=serialize(nan)), "NaN"),
            (dict(good, hidden_states=serialize(nan), grad_outputs=serialize(hidden)), "NaN"),
            (dict(good, span=pb.Span(start=0, end=6), grad_outputs=serialize(hidden)), held),
            (dict(good, hidden_states=serialize(hidden[0]), grad_outputs=serialize(hidden[0])), "shape"),
            (
                dict(good, grad_outputs=serialize(hidden), prompts=serialize(torch.zeros(1, 2, 3))),
                "prompts must be",
            ),
            (dict(good, grad_outputs=serialize(hidden), prompts=serialize(too_long)), "prompts must cover"),
        ]
        for fields, words in cases:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Backward(pb.BackwardRequest(**fields), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (words, refused.value)
            assert words in refused.value.details(), (words, refused.value.details())
        with pytest.raises(grpc.RpcError) as mismatch:  # as a Forward of another model
            stub.Backward(
                pb.BackwardRequest(**dict(good, model_id="other-model"), grad_outputs=serialize(hidden))
            )
        assert mismatch.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "other-model" in mismatch.value.details()
        reply = stub.Backward(pb.BackwardRequest(**good, grad_outputs=serialize(hidden)), timeout=30)
        assert list(reply.grad_inputs.shape) == list(hidden.shape) and reply.compute_s > 0


def test_a_server_that_dies_before_the_backward_is_replaced(training_swarm, llama_untied):
    """The forward ran through a server that is gone when ``backward()`` comes: its blocks run again on
    the other holder, and the gradients are still the local model's. (Last: it kills a server.)"""
    local = reference(llama_untied)
    ids, mask = prompt(2, seed=5)
    labels = ids.masked_fill(mask == 0, -100)
    with ShardedModel.from_pretrained(llama_untied, training_swarm.initial_peers, verify_fraction=0) as model:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        gone = model.last_route[0]
        process = serving_process(training_swarm, gone.server.record.port)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        out.loss.backward()
        local(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        embed = model.get_input_embeddings().weight.grad
        assert close(embed, local.get_input_embeddings().weight.grad)
        assert model.health.counts().get("failovers", 0) >= 1
        assert gone.peer_id not in {hop.peer_id for hop in model.route()}


@pytest.mark.slow  # 15 s; the prompt-tuning tests above cover its mechanism (README "Tests")
def test_the_finetune_example_lowers_the_loss_on_smollm2(smollm2_swarm, smollm2_path):
    """clients/finetune.py, as the README runs it (fewer steps): deep prompts trained on the shipped text."""
    result = subprocess.run(
        [sys.executable, "clients/finetune.py", "--model", str(smollm2_path)]
        + ["--initial-peers", *smollm2_swarm.initial_peers, "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in result.stdout.splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.stderr.strip().splitlines() == [f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in 3 steps"]
