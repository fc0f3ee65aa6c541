"""`generate()`'s stop check deferred by a step for Step-3 on CUDA: the same tokens, one extra step, no effect on
other models or on calls that return their cache."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation import utils as generation_utils
from transformers.generation.streamers import BaseStreamer
from triton_cases import CUDA_ONLY

import step3_hf  # noqa: F401
from step3_hf import deferred_stop_check
from step3_hf.tiny_checkpoint import write_tiny_checkpoint

PAD = 0
PROMPTS = torch.tensor([[1, 17, 33, 90, 4], [0, 0, 1, 8, 9]])
MASK = (PROMPTS != PAD).long()
MASK[0, 0] = 1


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("stop"), vl=False, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    with torch.no_grad():  # larger weights, so that greedy continuations vary from token to token
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(4.0)
    return model


class _HostEvent:
    """A stand-in for `torch.Event` on the CPU, which has none: CPU work is done when it is issued."""

    def __init__(self, device=None, blocking=False):
        pass

    def record(self):
        pass

    def synchronize(self):
        pass


class _Counting:
    """Counts the stop checks `generate` builds, by kind."""

    def __init__(self, monkeypatch):
        self.deferred = 0
        counter = self

        class Deferred(generation_utils.DeferredStopCheck):
            def __init__(self, *args, **kwargs):
                counter.deferred += 1
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(generation_utils, "DeferredStopCheck", Deferred)


class _Tokens(BaseStreamer):
    def __init__(self):
        self.puts = []

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.puts.append("end")


def _generate(model, device_types, monkeypatch, **kwargs):
    """Greedy `generate` with deferral on the devices named, counting stop checks and forward passes."""
    monkeypatch.setattr(deferred_stop_check, "DEVICE_TYPES", device_types)
    counting = _Counting(monkeypatch)
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=PAD)
        with torch.no_grad():
            out = model.generate(
                PROMPTS.to(model.device), attention_mask=MASK.to(model.device), generation_config=config, **kwargs
            )
    finally:
        handle.remove()
    return out, counting.deferred, len(forwards)


@pytest.fixture
def cpu_events(monkeypatch):
    monkeypatch.setattr(torch, "Event", _HostEvent)


def _eos_that_stops_early(model, monkeypatch):
    """A token both rows emit within the first few steps, so that an end-of-sequence stop ends the run early."""
    free, _, _ = _generate(model, (), monkeypatch, eos_token_id=None)
    new = free[:, PROMPTS.shape[1] :].tolist()
    for token in new[0][1:5]:
        if token in new[1][:8] and token != PAD:
            return token
    pytest.skip(f"no shared early token in {new}")


CUDA = pytest.param("cuda", marks=CUDA_ONLY)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_deferred_check_gives_the_same_tokens_and_decodes_one_step_more(model, monkeypatch, device):
    if device == "cpu":
        monkeypatch.setattr(torch, "Event", _HostEvent)
    else:
        model = copy.deepcopy(model).to(device, torch.bfloat16)
    eos = _eos_that_stops_early(model, monkeypatch)
    synced, synced_checks, synced_forwards = _generate(model, (), monkeypatch, eos_token_id=eos)
    deferred, deferred_checks, deferred_forwards = _generate(model, (device,), monkeypatch, eos_token_id=eos)
    assert (synced_checks, deferred_checks) == (0, 1)
    assert synced.shape[1] < PROMPTS.shape[1] + 10, "the end-of-sequence token must stop the run early"
    assert deferred.tolist() == synced.tolist()
    # The stop is read a step late: one forward pass more, which `generate` takes back off the output.
    assert deferred_forwards == synced_forwards + 1


def test_a_run_that_ends_at_max_length_decodes_no_extra_step(model, monkeypatch, cpu_events):
    synced, _, synced_forwards = _generate(model, (), monkeypatch, eos_token_id=None)
    deferred, checks, deferred_forwards = _generate(model, ("cpu",), monkeypatch, eos_token_id=None)
    assert checks == 1
    assert deferred.tolist() == synced.tolist()
    assert deferred_forwards == synced_forwards == 10


def test_streamed_tokens_are_the_same(model, monkeypatch, cpu_events):
    eos = _eos_that_stops_early(model, monkeypatch)
    streams = []
    for device_types in ((), ("cpu",)):
        streamer = _Tokens()
        prompt = PROMPTS[:1]
        monkeypatch.setattr(deferred_stop_check, "DEVICE_TYPES", device_types)
        config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
        with torch.no_grad():
            model.generate(prompt, generation_config=config, streamer=streamer)
        streams.append(streamer.puts)
    assert streams[1] == streams[0]
    assert streams[0][-1] == "end" and len(streams[0]) > 2


def test_a_returned_cache_keeps_the_per_step_check(model, monkeypatch, cpu_events):
    eos = _eos_that_stops_early(model, monkeypatch)
    synced, _, synced_forwards = _generate(model, (), monkeypatch, eos_token_id=eos, return_dict_in_generate=True)
    kept, checks, forwards = _generate(model, ("cpu",), monkeypatch, eos_token_id=eos, return_dict_in_generate=True)
    assert checks == 0 and forwards == synced_forwards
    assert kept.sequences.tolist() == synced.sequences.tolist()


def test_other_models_and_other_devices_keep_upstreams_choice(monkeypatch, cpu_events):
    cuda = torch.device("cuda")
    assert not generation_utils.DeferredStopCheck.is_supported(cuda, None, False, False), "outside Step-3 sampling"
    # A non-Step-3 model sampling on a device Step-3 would defer on keeps the per-step check.
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).eval()
    monkeypatch.setattr(deferred_stop_check, "DEVICE_TYPES", ("cpu",))
    counting = _Counting(monkeypatch)
    with torch.no_grad():
        llama.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert counting.deferred == 0


def test_the_policy_reads_device_assistant_and_returned_cache_once_per_sampling():
    def supported_in_step3_sampling(*args):
        token = deferred_stop_check._sampling_step3.set(True)
        try:
            return generation_utils.DeferredStopCheck.is_supported(*args)
        finally:
            deferred_stop_check._sampling_step3.reset(token)

    assert supported_in_step3_sampling(torch.device("cuda", 0), None, False, False)
    assert not supported_in_step3_sampling(torch.device("cpu"), None, False, False)
    assert not supported_in_step3_sampling(torch.device("cuda"), None, True, False)  # the cache outlives the call
    assert not supported_in_step3_sampling(torch.device("cuda"), None, False, True)  # an assistant
    # Read once: a generate() nested in this one (in a logits processor, a streamer) keeps upstream's choice.
    token = deferred_stop_check._sampling_step3.set(True)
    try:
        supported = generation_utils.DeferredStopCheck.is_supported
        assert supported(torch.device("cuda"), None, False, False)
        assert not supported(torch.device("cuda"), None, False, False)
    finally:
        deferred_stop_check._sampling_step3.reset(token)
