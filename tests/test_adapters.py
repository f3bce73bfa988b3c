"""Server-side LoRA adapters (issue 22): `shardnet serve --adapters DIR ...` loads PEFT LoRA folders; a
client with `active_adapter=NAME` routes only through servers that announce it and gets local
transformers + peft's tokens, while clients on other adapters and on the base model share the servers."""

from __future__ import annotations

import threading
import warnings

import grpc
import pytest
import torch

from shardnet import ShardedModel
from shardnet.client.swarm_status import status_document
from shardnet.dht import lookup
from shardnet.errors import RouteNotFoundError
from shardnet.wire import pb, pb_grpc
from shardnet.wire.tensors import serialize
from tests.conftest import prompt, reference, running_swarm

peft = pytest.importorskip("peft")
GREEDY = dict(do_sample=False, eos_token_id=None, max_new_tokens=8)
ADAPTERS = {"alpha": (1, ["q_proj", "v_proj"]), "beta": (2, ["o_proj", "down_proj", "up_proj"])}


def make_adapter(base_path, folder, seed: int, targets: list[str]):
    """A LoRA adapter with random (not zero) weights, saved as PEFT saves one."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():  # peft 0.21 reads a transformers property deprecated in 5.24
        warnings.simplefilter("ignore", FutureWarning)
        peft.get_peft_model(reference(base_path), config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_folders(llama_untied, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_adapter(llama_untied, root / name, seed, targets)
        for name, (seed, targets) in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def adapter_swarm(llama_untied, adapter_folders, tmp_path_factory):
    """Two servers with both adapters (0:3, 3:6), and one holding every block with none."""
    args = ["--adapters", *(str(folder) for folder in adapter_folders.values())]
    yield from running_swarm(
        llama_untied,
        [(0, 3), (3, 6), (0, 6)],
        tmp_path_factory.mktemp("adapter_logs"),
        server_args=[args, args, []],
    )


def local_model(llama_untied, folder):
    base = reference(llama_untied)
    if folder is None:
        return base
    with warnings.catch_warnings():  # as in make_adapter
        warnings.simplefilter("ignore", FutureWarning)
        return peft.PeftModel.from_pretrained(base, folder).eval()


def test_concurrent_clients_on_different_adapters_and_the_base_model_are_exact(
    adapter_swarm, adapter_folders, llama_untied
):
    choices = [None, "alpha", "beta"]
    locals_ = {name: local_model(llama_untied, adapter_folders.get(name)) for name in choices}
    prompts = [prompt(1, seed=s)[0] for s in range(3)] + [prompt(2, seed=9)]
    wants = {}
    for name in choices:
        for index, ids in enumerate(prompts):
            ids, mask = ids if isinstance(ids, tuple) else (ids, None)
            with torch.no_grad():
                wants[name, index] = locals_[name].generate(ids, attention_mask=mask, **GREEDY)
    got, routes, errors = {}, {}, []

    def client(name):
        try:
            with ShardedModel.from_pretrained(
                llama_untied, adapter_swarm.initial_peers, active_adapter=name, verify_fraction=0
            ) as model:
                for index, ids in enumerate(prompts):
                    ids, mask = ids if isinstance(ids, tuple) else (ids, None)
                    got[name, index] = model.generate(ids, attention_mask=mask, **GREEDY)
                    routes.setdefault(name, set()).update(
                        hop.server.record.end - hop.server.record.start for hop in model.last_route
                    )
        except Exception as error:  # noqa: BLE001 - reported below with the adapter's name
            errors.append((name, error))

    threads = [threading.Thread(target=client, args=(name,)) for name in choices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for key, want in wants.items():
        assert torch.equal(got[key], want), key
    assert routes["alpha"] == routes["beta"] == {3}  # never the server without adapters (it holds 6 blocks)
    assert not torch.equal(wants["alpha", 0], wants[None, 0])  # the adapters change the tokens
    for log in adapter_swarm.log_dir.glob("server_*.log"):  # loading two adapters warns nobody
        assert "Warning" not in log.read_text(), log


def test_status_shows_the_adapters_and_unknown_ones_are_refused(adapter_swarm, llama_untied):
    per_block = lookup(adapter_swarm._probe, adapter_swarm.model_id, adapter_swarm.num_blocks)
    document = status_document(per_block, adapter_swarm.model_id, adapter_swarm.num_blocks, "llama")
    assert sorted(tuple(s["adapters"]) for s in document["servers"]) == [
        (),
        ("alpha", "beta"),
        ("alpha", "beta"),
    ]
    with ShardedModel.from_pretrained(
        llama_untied, adapter_swarm.initial_peers, active_adapter="gamma", route_timeout_s=1.0
    ) as model:
        with pytest.raises(RouteNotFoundError, match="no adapter gamma"):
            model.generate(prompt(1)[0], **GREEDY)
    server = next(s for s in document["servers"] if s["adapters"])
    with grpc.insecure_channel(server["address"]) as channel:
        stub = pb_grpc.ShardStub(channel)
        start, end = (int(x) for x in server["span"].split(":"))
        request = pb.ForwardRequest(
            model_id=adapter_swarm.model_id,
            span=pb.Span(start=start, end=end),
            hidden_states=serialize(torch.randn(1, 3, 64)),
            adapter="gamma",
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.Forward(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not served here" in refused.value.details()
