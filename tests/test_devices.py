"""Where the shell's model functions leave their outputs when a model is spread over devices.

No second accelerator is here: the tests put the embedding (the core's home device) on the meta
device and leave the backbone and lm_head on the CPU, which stands in for a device map whose last
layer and lm_head sit on another GPU than the embedding. They show that the outputs the core
reads (last hidden states, logits) come back to the home device; what a real two-GPU run does
past that (accelerate's hooks, copies between GPUs) is checked by benchmarks/gpu_check.py only.
"""

from __future__ import annotations

import torch

from gcache.io.models.hf import model_fns
from gcache.io.models.local import tiny_model


def _spread_model():
    """A tiny model whose input embedding (the home device) is on meta and everything else on the CPU."""
    model = tiny_model("qwen3", tie_word_embeddings=False).model
    embedding = torch.nn.Embedding(*model.get_input_embeddings().weight.shape, device="meta")
    model.get_input_embeddings = lambda: embedding
    return model


def test_forward_and_logits_come_back_to_the_embedding_device():
    model = _spread_model()
    fns = model_fns(model)
    assert fns.device == torch.device("meta")
    embeds = torch.randn(2, 3, fns.hidden_size)  # on the CPU, where the backbone is
    with torch.no_grad():
        hidden, state = fns.forward(embeds, None, None, fns.to_state(None))
        logits = fns.logits(torch.randn(2, fns.hidden_size))
    assert hidden.device == fns.device and hidden.shape == (2, 3, fns.hidden_size)
    assert logits.device == fns.device
    assert state.get_seq_length() == 3


def test_static_step_comes_back_to_the_embedding_device():
    model = _spread_model()
    fns = model_fns(model, static=True)
    empty = fns.from_state(fns.forward(torch.randn(1, 2, fns.hidden_size), None, None, fns.to_state(None))[1],
                           torch.ones(1, 2, dtype=torch.bool), torch.tensor([2]))
    cpu = empty._replace(keys=torch.randn_like(empty.keys, device="cpu"), values=torch.randn_like(empty.values, device="cpu"),
                         mask=torch.ones(1, 2, dtype=torch.bool), next_pos=torch.tensor([2]))
    with torch.no_grad():
        state = fns.static.init(cpu, 4)
        mask = torch.tensor([[True, True, True, False]])
        hidden, _ = fns.static.forward(torch.randn(1, 1, fns.hidden_size), mask, torch.tensor([[2]]), state)
    assert hidden.device == fns.device


def test_the_fusers_reference_batch_is_on_the_models_device(monkeypatch):
    """--reward accuracy with a mixing fuser: the reference answer's batch goes to the model's device."""
    import dataclasses

    from gcache.core.fusion import FuserConfig
    from gcache.io.runner import learner as learner_module
    from gcache.io.runner.communication import Context, FusionInputs
    from gcache.io.tasks.datasets import Item

    local = tiny_model("llama")
    away = dataclasses.replace(local, device=torch.device("meta"))  # stands in for a GPU
    real_encode = learner_module.encode_chat
    monkeypatch.setattr(learner_module, "encode_chat", lambda _model, conversations: real_encode(local, conversations))
    config = FuserConfig(num_layers=2, num_agents=2, mode="weighted")
    learner = learner_module.Learner(lr=1e-3, seed=0, graph=None, fuser=config, local=away, fuser_target="reference")
    fusion = FusionInputs((), torch.ones(1), torch.zeros(1, dtype=torch.long))
    context = Context([{"role": "user", "content": "2+2?"}], None, None, fusion)
    item = Item("gsm8k/test/0", "gsm8k", 0, "2+2?", "4")
    example = learner._fuser_example(item, context)
    assert all(t.device == torch.device("meta") for t in example.answer)
