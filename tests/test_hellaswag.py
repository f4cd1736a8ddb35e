"""HellaSwag offline: items in the Hub's schema made here, the batched scorer against a plain loop,
a model that knows the right endings, the sharded count, and ``minigpt eval hellaswag``."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minigpt.checkpoint import save_checkpoint
from minigpt.cli import main
from minigpt.errors import NetworkError
from minigpt.hellaswag import HellaSwagItem, ending_losses, fit_row, load_items, score_items
from minigpt.model import GPT, GPTConfig
from minigpt.runs import RunInfo, write_run
from minigpt.tokenizer import BPETokenizer

#: A character vocabulary for the random models: a space, then the letters.
CHARS = " abcdefghijklmnopqrstuvwxyz"


def char_encode(text: str) -> list[int]:
    return [CHARS.index(c) for c in text]


def hub_row(context: str, endings: list[str], label: int) -> dict:
    """A row as ``Rowan/hellaswag`` has it: the label a string, and fields the scorer never reads."""
    return {"ind": 0, "activity_label": "Testing", "ctx_a": context, "ctx_b": "", "ctx": context,
            "endings": endings, "source_id": "test", "split": "val", "split_type": "indomain", "label": str(label)}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def random_items(n: int, seed: int = 0) -> list[HellaSwagItem]:
    """Items of random letters whose endings differ in length (1 to 12 characters), so that the
    summed and the mean loss often disagree; a few contexts are longer than the models' context."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return "".join(rng.choice(CHARS[1:]) for _ in range(rng.randint(lo, hi)))

    return [HellaSwagItem(text(3, 40 if i % 5 == 0 else 12), tuple(text(1, 12) for _ in range(4)), rng.randrange(4))
            for i in range(n)]


def random_gpt(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    config = {"vocab_size": len(CHARS), "block_size": 24, "n_layer": 2, "n_head": 2, "n_embd": 32, **overrides}
    return GPT(GPTConfig(**config))  # type: ignore[arg-type]


def naive_losses(model: GPT, encode, item: HellaSwagItem) -> list[tuple[float, int]]:
    """Each ending's summed loss and token count, one unpadded row at a time: the definition."""
    out = []
    block = model.config.block_size
    for ending in item.endings:
        end = encode(" " + ending)[:block]
        ctx = encode(item.context)[-(block + 1 - len(end)):]  # cut from the left, the ending kept
        row = torch.tensor([ctx + end])
        with torch.no_grad():
            logits = model(row[:, :-1])[0][0]
        losses = F.cross_entropy(logits[len(ctx) - 1:], torch.tensor(end), reduction="none")
        out.append((float(losses.sum()), len(end)))
    return out


# -- (a) the items -------------------------------------------------------------------------------

def test_items_in_the_hub_schema_load_from_local_files_with_int_labels(tmp_path):
    rows = [hub_row("A man is sitting on a roof. He", ["is using wrap.", "is ripping level tiles off.",
                                                        "is holding a rubik's cube.", "starts pulling up roofing."], 3),
            hub_row("A woman bends down", ["and smiles.", "to pick up a ball.", "as it rains.", "to the door."], 1)]
    path = write_jsonl(tmp_path / "val.jsonl", rows)
    items = load_items(data_files=path)
    assert items == [HellaSwagItem(r["ctx"], tuple(r["endings"]), int(r["label"])) for r in rows]
    assert load_items(data_files=[str(path)], limit=1) == items[:1]
    (tmp_path / "val.json").write_text(json.dumps(rows))  # a JSON array reads too
    assert load_items(data_files=tmp_path / "val.json") == items


@pytest.mark.parametrize(("change", "message"), [
    ({"endings": ["a", "b", "c"]}, "row 1: endings must be a list of 4 strings"),
    ({"label": "4"}, "row 1: label must be 0, 1, 2 or 3"),
    ({"label": ""}, "row 1: label must be 0, 1, 2 or 3"),  # the Hub's test split has no labels
    ({"ctx": ""}, "row 1: ctx must be a non-empty string"),
])
def test_rows_out_of_schema_are_refused_naming_the_file_and_row(tmp_path, change, message):
    good = hub_row("A woman bends down", ["and smiles.", "to pick up a ball.", "as it rains.", "to the door."], 1)
    path = write_jsonl(tmp_path / "bad.jsonl", [good, {**good, **change}])
    with pytest.raises(ValueError, match=f"{path}, {message}"):
        load_items(data_files=path)


def test_a_row_without_a_field_or_a_file_that_is_not_json_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "other.jsonl", [{"question": "?", "answer": "!"}])
    with pytest.raises(ValueError, match=rf"{path}, row 0 has no field 'ctx'"):
        load_items(data_files=path)
    (tmp_path / "broken.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="broken.jsonl is not JSON or JSONL rows"):
        load_items(data_files=tmp_path / "broken.jsonl")
    for text in ("", "[]\n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(ValueError, match="empty.jsonl holds no HellaSwag rows"):
            load_items(data_files=tmp_path / "empty.jsonl")


def test_the_hub_fails_fast_offline_and_names_the_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(NetworkError, match=r"Rowan/hellaswag.*HF_HUB_OFFLINE is set.*data_files="):
        load_items(limit=10)
    assert time.perf_counter() - start < 5


# -- (b) the batched scorer is the definition ----------------------------------------------------

def test_batched_scores_equal_one_row_at_a_time_with_long_contexts_cut_from_the_left():
    model = random_gpt(dropout=0.2).train()  # dropout would differ from row to row: the scorer must switch it off
    items = random_items(23)
    sums, counts = ending_losses(model, char_encode, items, batch_size=5)  # the last batch is short
    assert model.training  # given back in the mode it had
    model.eval()
    naive = [naive_losses(model, char_encode, item) for item in items]
    torch.testing.assert_close(sums, torch.tensor([[s for s, _ in row] for row in naive]), atol=1e-4, rtol=1e-5)
    assert counts.tolist() == [[c for _, c in row] for row in naive]
    assert any(len(char_encode(it.context)) + max(counts[i]) > model.config.block_size + 1
               for i, it in enumerate(items))  # some rows really were cut

    labels = [it.label for it in items]
    by_sum = [min(range(4), key=lambda k: row[k][0]) for row in naive]
    by_mean = [min(range(4), key=lambda k: row[k][0] / row[k][1]) for row in naive]
    assert by_sum != by_mean  # items where acc and acc_norm choose differently
    result = score_items(model, char_encode, items, batch_size=4)
    assert result == {"acc": sum(p == y for p, y in zip(by_sum, labels)) / len(items),
                      "acc_norm": sum(p == y for p, y in zip(by_mean, labels)) / len(items), "n": len(items)}


def test_autocast_scores_close_to_float32():
    model, items = random_gpt().eval(), random_items(8, seed=1)
    full, _ = ending_losses(model, char_encode, items)
    half, _ = ending_losses(model, char_encode, items, dtype=torch.bfloat16)
    torch.testing.assert_close(half, full, atol=0.1 * full.abs().max().item(), rtol=0.05)


def test_fit_row_keeps_the_ending_and_the_context_next_to_it():
    assert fit_row([1, 2, 3], [4, 5], 8) == ([1, 2, 3], [4, 5])
    assert fit_row([1, 2, 3, 4, 5, 6], [7, 8], 4) == ([4, 5, 6], [7, 8])  # 5 tokens: 4 inputs and a target
    assert fit_row([1, 2], [3, 4, 5, 6, 7, 8], 4) == ([2], [3, 4, 5, 6])  # one context token always stays
    with pytest.raises(ValueError, match="at least one context token"):
        fit_row([], [1], 4)


# -- (c) a model that knows the right endings picks them -----------------------------------------

#: Words as tokens: each word is one id, so an ending's tokens are its words.
WORDS = [f"w{i}" for i in range(40)]


def word_encode(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def test_a_model_trained_on_the_right_endings_picks_them_and_a_misplaced_scorer_would_not(tmp_path):
    """Twelve ten-word stories, learned by heart; each gives three items, its first five words as
    the context. The endings differ from the right one only in the next word (one-word endings),
    only in the last of five words, or everywhere (other stories' endings). Scoring the context,
    or the ending's positions shifted by one either way, ties the endings of one kind or another
    (causal attention: equal tokens before a position give equal losses there), and a tie picks
    the first ending, right for a quarter of the items alone."""
    rng = random.Random(0)
    stories = [rng.sample(range(len(WORDS)), 10) for _ in range(12)]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(WORDS), block_size=16, n_layer=2, n_head=2, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.tensor(stories)
    for _ in range(100):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05

    def text(ids: list[int]) -> str:
        return " ".join(WORDS[i] for i in ids)

    items = []
    for s, story in enumerate(stories):
        others = [w for w in range(len(WORDS)) if w not in story]
        rng.shuffle(others)
        kinds = ([[story[5]], *([w] for w in others[:3])],
                 [story[5:], *(story[5:9] + [w] for w in others[3:6])],
                 [story[5:], *(stories[(s + k) % len(stories)][5:] for k in (1, 2, 3))])
        for right, *wrong in kinds:
            label = len(items) % 4
            endings = [*wrong[:label], right, *wrong[label:]]
            items.append(HellaSwagItem(text(story[:5]), tuple(text(e) for e in endings), label))
    result = score_items(model, word_encode, items, batch_size=8)
    assert result["acc"] >= 0.95 and result["acc_norm"] >= 0.95, result  # chance: 0.25; a broken scorer <= 0.75


# -- (e) shards ----------------------------------------------------------------------------------

def test_shards_sum_to_the_whole(monkeypatch):
    """Each rank scores every world_size-th item; all_reduce (here: left as each rank's own
    counts, summed by hand) makes the whole figure."""
    model, items = random_gpt().eval(), random_items(11, seed=2)
    whole = score_items(model, char_encode, items)
    reduced = []
    monkeypatch.setattr("torch.distributed.all_reduce", lambda t: reduced.append(t.clone()))
    shards = [score_items(model, char_encode, items, rank=r, world_size=3) for r in range(3)]
    assert [s["n"] for s in shards] == [4, 4, 3] and len(reduced) == 3
    for key in ("acc", "acc_norm"):
        assert sum(s[key] * s["n"] for s in shards) == pytest.approx(whole[key] * whole["n"])
    assert sum(t[2] for t in reduced) == len(items)  # the third count is n: all_reduce sums them
    with pytest.raises(ValueError, match="rank=3 must be in 0..world_size-1"):
        score_items(model, char_encode, items, rank=3, world_size=3)


def _score_on_rank(rank: int, world_size: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        results = [score_items(random_gpt().eval(), char_encode, random_items(n, seed=2), rank=rank,
                               world_size=world_size) for n in (11, 1)]  # with one item, rank 1 has none
        Path(out, f"{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_each_get_the_whole_figure(tmp_path):
    torch.multiprocessing.spawn(_score_on_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)),
                                nprocs=2)
    whole = [score_items(random_gpt().eval(), char_encode, random_items(n, seed=2)) for n in (11, 1)]
    assert [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)] == [whole, whole]


# -- (d) the command line ------------------------------------------------------------------------

@pytest.fixture
def eval_run(tmp_path: Path, base_tok: BPETokenizer) -> tuple[Path, GPT, Path]:
    """A run folder of a small random model with the tests' tokenizer, and items for it."""
    folder = tmp_path / "run"
    folder.mkdir()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=base_tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(folder / "checkpoint.safetensors", model, step=1)
    base_tok.save(folder / "tokenizer.bpe")
    write_run(folder, RunInfo("pretrain", "ci", {}, None, "test"))
    rows = [hub_row(f"What is {a} + {b}? The answer", [f"is {a + b + d}." for d in (-1, 0, 1, 2)], 1)
            for a, b in ((37, 48), (12, 5), (3, 4), (20, 22), (9, 9))]
    return folder, model.eval(), write_jsonl(tmp_path / "items.jsonl", rows)


def test_cli_scores_a_run_folder_on_local_items(eval_run, base_tok, tmp_path, capsys):
    folder, model, items_file = eval_run
    out = tmp_path / "result.json"
    assert main(["eval", "hellaswag", str(folder), "--data-files", str(items_file), "--device", "cpu",
                 "--batch-size", "2", "--out", str(out)]) == 0
    expected = score_items(model, base_tok.encode, load_items(data_files=items_file))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"hellaswag acc_norm {expected['acc_norm']:.4f} acc {expected['acc']:.4f} on 5 items "
                    f"({folder})")
    record = json.loads(out.read_text())
    assert {k: record[k] for k in expected} == expected and record["run"] == str(folder)
    assert main(["eval", "hellaswag", str(folder), "--data-files", str(items_file), "--limit", "2"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"on 2 items ({folder})")


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_cli_offline_fails_fast_in_one_line(eval_run, tmp_path, capsys, monkeypatch):
    folder, _, items_file = eval_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(["eval", "hellaswag", "gpt2"]) == 2
    line = error_line(capsys)
    assert line.startswith("minigpt: error: HellaSwag's validation set (downloaded from 'Rowan/hellaswag'")
    assert "HF_HUB_OFFLINE is set" in line and "--data-files" in line
    assert main(["eval", "hellaswag", str(folder)]) == 2  # a run folder still needs the items
    assert "--data-files" in error_line(capsys)
    assert main(["eval", "hellaswag", "gpt2", "--data-files", str(items_file)]) == 2
    line = error_line(capsys)
    assert "GPT-2 weights 'gpt2'" in line and "HF_HUB_OFFLINE is set" in line
    assert time.perf_counter() - start < 15


@pytest.mark.parametrize(("argv", "message"), [
    (["nowhere"], "nowhere is neither a run folder nor a GPT-2 name (gpt2, gpt2-medium"),
    (["RUN", "--limit", "0"], "--limit 0 must be at least 1"),
    (["RUN", "--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["RUN", "--model.n_layer", "2"], "eval takes no recipe settings"),
])
def test_cli_refuses_mistakes_before_any_work(eval_run, capsys, argv, message):
    folder, _, items_file = eval_run
    argv = [str(folder) if a == "RUN" else a for a in argv]
    assert main(["eval", "hellaswag", *argv, "--data-files", str(items_file)]) == 2
    assert message in error_line(capsys)



def test_pretraining_reports_hellaswag_at_each_evaluation(tmp_path, monkeypatch):
    """The recipe's ``pretrain.hellaswag`` puts acc_norm into every evaluation's record (the items
    load before training starts: offline, the run stops at once); the figure is the scorer's own."""
    import minigpt.hellaswag
    from minigpt.pretrain import pretrain
    from minigpt.recipe import recipe

    items = random_items(12, seed=3)
    monkeypatch.setattr(minigpt.hellaswag, "load_items", lambda limit: items[:limit])
    r = recipe("ci", {"pretrain.steps": 4, "pretrain.eval_interval": 2, "pretrain.hellaswag": 10})
    trainer = pretrain(r, tmp_path / "run", progress=False, sample_interval=0)
    evaluations = [record for record in trainer.history if "val_loss" in record]
    assert [record["step"] for record in evaluations] == [2, 4]
    tok = BPETokenizer.load(tmp_path / "run" / "tokenizer.bpe")
    assert evaluations[-1]["hellaswag"] == score_items(trainer.raw_model, tok.encode, items[:10])["acc_norm"]
