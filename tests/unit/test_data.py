"""Unit tests for longtrain.data: tokenizers, sources, packing, needle task, sampler, datasets."""

import json
import os

import numpy as np
import pytest
import torch

from longtrain.data import (
    ByteTokenizer,
    HFTokenizer,
    NeedleTask,
    ResumableSampler,
    build_dataset,
    collate,
    iter_jsonl,
    iter_text,
    load_memmap,
    load_tokenizer,
    needle_accuracy,
    pack_documents,
)

BYTE = ByteTokenizer()
EOS, PAD = BYTE.eos_id, BYTE.pad_id


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    text = "héllo wörld, 長い文脈 🚀"
    ids = BYTE.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert BYTE.decode(ids) == text
    assert BYTE.decode([BYTE.bos_id] + ids + [BYTE.eos_id, BYTE.pad_id]) == text  # specials dropped
    assert BYTE.decode(ids[:-1]).endswith("\ufffd")  # a cut character is replaced, not an error
    assert (BYTE.vocab_size, BYTE.bos_id, BYTE.eos_id, BYTE.pad_id) == (259, 256, 257, 258)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def _train_bpe(path, specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the secret value for key alpha is 12345.", "what is the grass green sky blue", "héllo wörld"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path))
    return str(path)


@pytest.fixture
def hf_path(tmp_path):
    return _train_bpe(tmp_path / "tokenizer.json", ["<|begin_of_text|>", "<|end_of_text|>", "<pad>"])


def test_hf_tokenizer_bpe(hf_path):
    tok = load_tokenizer(hf_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    text = "The secret value for key alpha is 98765. héllo"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids  # no specials added
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    assert tok.vocab_size == 300
    assert load_tokenizer(os.path.dirname(hf_path)).eos_id == 1  # a folder holding tokenizer.json works too


def test_hf_tokenizer_wordlevel_and_config(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "<mystop>": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<mystop>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    t = HFTokenizer(str(tmp_path / "tokenizer.json"))
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 2)  # no pad token: pad = eos
    assert t.encode("hello world") == [3, 4]
    assert t.decode([1, 3, 4, 2]) == "hello world"
    # tokenizer_config.json beside the file wins over the common names.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<mystop>"}}))
    assert HFTokenizer(str(tmp_path / "tokenizer.json")).eos_id == 5


def test_hf_tokenizer_errors(tmp_path):
    path = _train_bpe(tmp_path / "tokenizer.json", ["<unk>"])
    with pytest.raises(ValueError, match="tokenizer.json.*eos_token"):
        HFTokenizer(path)
    with pytest.raises(ValueError, match="nope.json"):
        load_tokenizer(str(tmp_path / "nope.json"))


# ---------------------------------------------------------------- sources


def test_sources(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n')
    assert list(iter_jsonl([good], "text")) == ["one", "two"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2.*'text'"):
        list(iter_jsonl([bad], "text"))
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:3"):
        list(iter_jsonl(str(bad), "text"))
    with pytest.raises(ValueError, match="missing.jsonl"):
        list(iter_jsonl([tmp_path / "missing.jsonl"], "text"))

    (tmp_path / "d1.txt").write_text("first doc\nline 2")
    (tmp_path / "d2.txt").write_text("second")
    assert list(iter_text([tmp_path / "d1.txt", tmp_path / "d2.txt"])) == ["first doc\nline 2", "second"]

    np.array([5, 6, EOS, 7], dtype=np.uint16).tofile(tmp_path / "t.bin")
    (arr,) = load_memmap([tmp_path / "t.bin"], "uint16")
    assert arr.tolist() == [5, 6, EOS, 7]
    with pytest.raises(ValueError, match="memmap_dtype"):
        load_memmap([tmp_path / "t.bin"], "float32")
    with pytest.raises(ValueError, match="none.bin"):
        load_memmap([tmp_path / "none.bin"], "uint16")


# ---------------------------------------------------------------- packing


def test_packing_boundaries():
    docs = [[1, 2, 3], [4, 5], list(range(10, 24))]  # the last one spans several sequences
    S = 4
    seqs = pack_documents(docs, S, EOS, PAD)
    stream = [t for d in docs for t in d + [EOS]]
    assert len(seqs) == -(-(len(stream) - 1) // S)
    for s in seqs:
        for name in ("input_ids", "labels", "position_ids", "doc_ids"):
            t = getattr(s, name)
            assert t.dtype == torch.long and t.shape == (S,)
        assert (s.doc_ids.diff() >= 0).all() and s.doc_ids[0] == 0
        starts = torch.cat([torch.tensor([True]), s.doc_ids.diff() > 0])
        assert ((s.position_ids == 0) == starts).all()  # positions restart exactly at document starts
    inputs = torch.cat([s.input_ids for s in seqs])
    labels = torch.cat([s.labels for s in seqs])
    real = inputs != PAD
    # every token is conserved: inputs are the stream (its final eos only where room is left), then padding
    assert inputs[real].tolist() == stream[: int(real.sum())] and int(real.sum()) in (len(stream) - 1, len(stream))
    assert not real[real.sum() :].any()
    assert (labels[~real] == -100).all()
    for i in range(len(stream) - 1):
        if stream[i] == EOS:
            assert labels[i] == -100  # the next token belongs to another document
        else:
            assert labels[i] == stream[i + 1]  # includes predicting each document's eos
    assert seqs[0].labels.tolist() == [2, 3, EOS, -100]
    assert seqs[1].input_ids.tolist() == [4, 5, EOS, 10]
    assert seqs[1].position_ids.tolist() == [0, 1, 2, 0] and seqs[1].doc_ids.tolist() == [0, 0, 0, 1]
    # the long document continues across sequences with no label lost at the cut
    assert seqs[2].input_ids.tolist() == [11, 12, 13, 14] and seqs[1].labels[-1] == 11
    last = seqs[-1]
    assert last.input_ids.tolist() == [23, EOS, PAD, PAD] and last.labels.tolist() == [EOS, -100, -100, -100]
    assert last.doc_ids.tolist() == [0, 0, 1, 1]  # padding is a document of its own
    assert pack_documents([], S, EOS, PAD) == [] and pack_documents([[]], S, EOS, PAD) == []


def test_packing_exact_fit():
    seqs = pack_documents([[1, 2, 3, 4]], 4, EOS, PAD)  # 5 tokens = one window of seq_len + 1
    assert len(seqs) == 1 and seqs[0].input_ids.tolist() == [1, 2, 3, 4] and seqs[0].labels.tolist() == [2, 3, 4, EOS]


# ---------------------------------------------------------------- needle


def test_needle_sample():
    task = NeedleTask(BYTE, 300, seed=3)
    s = task.sample(7)
    assert set(s) == {"input_ids", "labels", "position_ids", "doc_ids", "answer_mask", "answer"}
    for k in ("input_ids", "labels", "position_ids", "doc_ids", "answer_mask"):
        assert s[k].shape == (300,)
    assert s["answer_mask"].dtype == torch.bool and s["input_ids"].dtype == torch.long
    assert s["position_ids"].tolist() == list(range(300)) and not s["doc_ids"].any()
    assert len(s["answer"]) == 5 and s["answer"].isdigit()
    assert BYTE.decode(s["labels"][s["answer_mask"]]) == s["answer"]
    assert (s["labels"][:-1] == s["input_ids"][1:]).all()  # loss_on=all: plain next-token labels
    text = BYTE.decode(s["input_ids"])
    assert f"is {s['answer']}." in text  # the needle
    assert text.endswith(f"is {s['answer']}")  # the question's answer (its final "." is the last label)
    assert s["input_ids"][0] == BYTE.bos_id
    # deterministic per (seed, index), whatever the call order or instance
    again = NeedleTask(BYTE, 300, seed=3)
    again.sample(2)
    assert all(torch.equal(s[k], again.sample(7)[k]) for k in ("input_ids", "labels", "answer_mask"))
    assert not torch.equal(s["input_ids"], task.sample(8)["input_ids"])
    assert not torch.equal(s["input_ids"], NeedleTask(BYTE, 300, seed=4).sample(7)["input_ids"])


def test_needle_answer_only_and_multikey():
    task = NeedleTask(BYTE, 400, n_keys=4, value_digits=3, loss_on="answer", seed=0)
    for i in range(5):
        s = task.sample(i)
        assert s["input_ids"].shape == (400,)
        assert ((s["labels"] != -100) == s["answer_mask"]).all() and s["answer_mask"].sum() == 3
        text = BYTE.decode(s["input_ids"])
        assert text.count("The secret value for key") == 4 + 1  # 4 needles + the question's restatement
        asked = text.split("What is the secret value for key ")[1].split("?")[0]
        assert f"key {asked} is {s['answer']}." in text
        assert BYTE.decode(s["labels"][s["answer_mask"]]) == s["answer"]


def test_needle_too_short_and_bad_args():
    with pytest.raises(ValueError, match=r"seq_len=50.*at least \d+"):
        NeedleTask(BYTE, 50)
    n = NeedleTask(BYTE, 500).min_seq_len
    assert NeedleTask(BYTE, n).sample(0)["input_ids"].shape == (n,)  # the minimum itself works
    with pytest.raises(ValueError, match="loss_on"):
        NeedleTask(BYTE, 500, loss_on="some")


def test_needle_hf_tokenizer(hf_path):
    tok = load_tokenizer(hf_path)
    task = NeedleTask(tok, 200, n_keys=2, seed=1)
    for i in range(3):
        s = task.sample(i)
        assert s["input_ids"].shape == (200,) and s["input_ids"][0] == tok.bos_id
        assert tok.decode(s["labels"][s["answer_mask"]]).strip() == s["answer"]


def test_needle_accuracy():
    task = NeedleTask(BYTE, 300, n_keys=2, seed=0)
    batch = collate([{k: v for k, v in task.sample(i).items() if k != "answer"} for i in range(4)])
    logits = torch.nn.functional.one_hot(batch["labels"].clamp(min=0), BYTE.vocab_size).float()
    assert needle_accuracy(logits, batch) == (4, 4)
    pred = batch["labels"].clone()
    assert needle_accuracy(pred, batch) == (4, 4)
    pred[~batch["answer_mask"]] = 0  # wrong outside the answer: still correct
    assert needle_accuracy(pred, batch) == (4, 4)
    wrong = pred.clone()
    row = batch["answer_mask"][1].nonzero()[-1, 0]
    wrong[1, row] = (wrong[1, row] + 1) % 256  # one digit wrong in sample 1
    assert needle_accuracy(wrong, batch) == (3, 4)
    assert needle_accuracy(logits[0], {k: v[0] for k, v in batch.items()}) == (1, 1)  # unbatched


# ---------------------------------------------------------------- sampler


def _take(sampler, steps):
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


def test_sampler_dp_invariance_resume_and_epochs():
    N, G, steps = 10, 4, 8  # batches straddle epoch ends
    one = _take(ResumableSampler(N, G, 0, 1, seed=5), steps)
    r0, r1 = _take(ResumableSampler(N, G, 0, 2, seed=5), steps), _take(ResumableSampler(N, G, 1, 2, seed=5), steps)
    assert [a + b for a, b in zip(r0, r1)] == one
    stream = [i for b in one for i in b]
    assert sorted(stream[:N]) == list(range(N)) and sorted(stream[N : 2 * N]) == list(range(N))
    assert stream[:N] != stream[N : 2 * N]  # re-shuffled each epoch
    # resume mid-epoch (and on another dp_size): the continuation is the same
    s = ResumableSampler(N, G, 0, 1, seed=5)
    _take(s, 3)
    state = s.state_dict()
    assert state["consumed"] == 3 * G
    t = ResumableSampler(N, G, 1, 2, seed=5)
    t.load_state_dict(state)
    assert _take(t, 2) == [b[2:] for b in one[3:5]]
    assert ResumableSampler(N, G, 0, 1, seed=5, shuffle=False).batch_indices(1) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="global_batch_size=5.*dp_size=2"):
        ResumableSampler(N, 5, 0, 2, seed=0)
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(N, G, 0, 1, seed=6).load_state_dict(state)


# ---------------------------------------------------------------- build_dataset


def _rows(ds):
    return {tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds))}


def test_build_dataset_needle_disjoint():
    kw = dict(tokenizer="byte", seq_len=256, num_samples=40, eval_fraction=0.25, needle_kwargs={"n_keys": 2, "loss_on": "answer"}, seed=1)
    train, ev = build_dataset("needle", split="train", **kw), build_dataset("needle", split="eval", **kw)
    assert len(train) == 40 and len(ev) == 10
    assert not _rows(train) & _rows(ev)
    b = collate([train[0], train[1]])
    assert b["input_ids"].shape == (2, 256) and b["answer_mask"].shape == (2, 256)
    assert all(torch.is_tensor(v) for v in b.values())


def test_build_dataset_jsonl_text_memmap(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = [f"document number {i} " * (i % 5 + 1) for i in range(30)]
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    kw = dict(tokenizer=BYTE, seq_len=64, paths=[str(path)], text_field="body", eval_fraction=0.1)
    train, ev = build_dataset("jsonl", split="train", **kw), build_dataset("jsonl", split="eval", **kw)
    n_tokens = sum(len(BYTE.encode(d)) + 1 for d in docs)
    assert len(train) + len(ev) == -(-(n_tokens - 1) // 64) and len(ev) == max(1, int((len(train) + len(ev)) * 0.1))
    assert not _rows(train) & _rows(ev)
    assert (ev[len(ev) - 1]["input_ids"] == BYTE.pad_id).any()  # the padded tail is in eval
    assert train.stream is ev.stream  # the eval split reuses the train split's tokenization
    with pytest.raises(ValueError, match="docs.jsonl:1"):
        build_dataset("jsonl", split="train", **{**kw, "text_field": "text"})

    (tmp_path / "a.txt").write_text("x" * 200)
    assert len(build_dataset("text", tokenizer=BYTE, seq_len=32, split="train", paths=[str(tmp_path / "a.txt")])) == 6

    # memmap: the file is the same stream as the jsonl, so it packs to the same sequences
    flat = np.array([t for d in docs for t in BYTE.encode(d) + [EOS]], dtype=np.uint16)
    flat.tofile(tmp_path / "docs.bin")
    mm = build_dataset("memmap", tokenizer=BYTE, seq_len=64, split="train", paths=[str(tmp_path / "docs.bin")], eval_fraction=0.1)
    assert len(mm) == len(train) and all(torch.equal(mm[i]["labels"], train[i]["labels"]) for i in range(len(mm)))
    np.array([1, 2, 999], dtype=np.uint16).tofile(tmp_path / "big.bin")
    with pytest.raises(ValueError, match="999.*memmap_dtype"):
        build_dataset("memmap", tokenizer=BYTE, seq_len=4, split="train", paths=[str(tmp_path / "big.bin")])
    with pytest.raises(ValueError, match="too few"):
        build_dataset("text", tokenizer=BYTE, seq_len=512, split="train", paths=[str(tmp_path / "a.txt")])
