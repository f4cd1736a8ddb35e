import pytest
import torch

from minigpt.model import GPT, GPTConfig
from minigpt.tasks import CopyTask
from minigpt.train import TrainConfig, Trainer


def test_rows_are_symbols_separator_copy_and_only_the_copy_is_a_target():
    task = CopyTask(length=5, vocab_size=7, batch_size=4, seed=3)
    x, y = task.next_batch()
    assert x.shape == y.shape == (4, task.block_size)
    assert (x[:, :5] < task.separator).all() and (x[:, 5] == task.separator).all()
    assert (y[:, :5] == -100).all()
    p = task.queries()
    assert torch.equal(y[:, p], x[:, p - task.length])  # the answer sits `length` positions back
    assert task.labels(x[0])[5] == "|" and all(len(s) == 1 for s in task.labels(x[0]))


def test_batches_are_reproducible_and_resume_where_they_stopped():
    a, b = CopyTask(seed=1), CopyTask(seed=1)
    first = [a.next_batch()[0] for _ in range(3)]
    state = a.state_dict()
    after = a.next_batch()[0]
    b.load_state_dict(state)
    assert torch.equal(b.next_batch()[0], after)
    a.reset()
    assert torch.equal(a.next_batch()[0], first[0])
    assert not torch.equal(first[0], first[1])
    with pytest.raises(ValueError, match="seed"):
        CopyTask(seed=2).load_state_dict(state)


def test_copy_weight_reads_the_stripe_length_positions_below_the_diagonal():
    task = CopyTask(length=4)
    T = task.block_size
    att = torch.zeros(2, 3, T, T)
    att[..., torch.arange(4, 8), torch.arange(0, 4)] = 1.0
    torch.testing.assert_close(task.copy_weight(att), torch.ones(2, 3))
    assert task.copy_weight(torch.eye(T)).item() == 0.0


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        CopyTask(length=0)
    with pytest.raises(ValueError):
        CopyTask(vocab_size=2)


def test_one_attention_layer_learns_to_copy():
    torch.manual_seed(0)
    task = CopyTask(length=6, vocab_size=10, batch_size=32)
    model = GPT(GPTConfig(vocab_size=task.vocab_size, block_size=task.block_size, n_layer=1, n_head=2, n_embd=32))
    cfg = TrainConfig(max_steps=150, learning_rate=3e-3, warmup_steps=10, eval_interval=0, checkpoint_interval=0)
    Trainer(model, cfg, task).fit(progress=False)
    x, y = task.sample(256, torch.Generator().manual_seed(99))
    with torch.no_grad():
        logits, _, att = model.eval()(x, return_attention=True)
    keep = y != -100
    assert (logits.argmax(-1)[keep] == y[keep]).float().mean() > 0.9
    assert task.copy_weight(att[0]).mean(0).max() > 0.5
