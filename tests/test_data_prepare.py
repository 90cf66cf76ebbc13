"""`data prepare` (text, directories, JSONL -> Megatron .bin/.idx) and the checks before
training on indexed data."""

from __future__ import annotations

import json

import pytest

from megatron_dualpipe.cli import main
from megatron_dualpipe.config import load_recipe
from megatron_dualpipe.errors import UserError

DOCS = ["def f(x):\n    return x + 1\n", "Hello, world! Ünïcödé text.\n" * 3,
        "class A:\n    pass\n"]


def _read(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Three text files (plus a binary file and a __pycache__ entry, both skipped), BPE with
    300 ids trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    (src / "__pycache__").mkdir(parents=True)
    for i, text in enumerate(DOCS):
        (src / f"doc{i}.py").write_text(text)
    (src / "image.bin").write_bytes(bytes([0xFF, 0xFE, 0x00, 0x80]))
    (src / "__pycache__" / "doc0.pyc").write_bytes(b"\x00compiled")
    prefix = str(root / "out" / "corpus")
    assert main(["data", "prepare", "--input", str(src), "--output-prefix", prefix,
                 "--vocab-size", "300"]) == 0
    return prefix


def test_prepare_round_trips_every_document(prepared):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(f"{prepared}.tokenizer.json")
    eod = tokenizer.token_to_id("<|endoftext|>")
    assert tokenizer.get_vocab_size() == 300
    docs = _read(prepared)
    assert len(docs) == len(DOCS)  # the binary file and __pycache__ are skipped
    for ids, text in zip(docs, DOCS):
        assert ids[-1] == eod and eod not in ids[:-1]
        assert tokenizer.decode(ids[:-1]) == text  # byte-level BPE is lossless


def test_prepare_jsonl_with_a_given_tokenizer(prepared, tmp_path):
    from tokenizers import Tokenizer

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"content": t, "id": i}) + "\n"
                             for i, t in enumerate(DOCS)) + "\n")
    prefix = str(tmp_path / "j")
    assert main(["data", "prepare", "--input", str(jsonl), "--output-prefix", prefix,
                 "--json-key", "content", "--tokenizer", f"{prepared}.tokenizer.json",
                 "--no-append-eod", "--workers", "2"]) == 0
    tokenizer = Tokenizer.from_file(f"{prepared}.tokenizer.json")
    assert _read(prefix) == [tokenizer.encode(t).ids for t in DOCS]


@pytest.mark.parametrize("case, args, message", [
    ("missing", ["--input", "{tmp}/nope.txt", "--vocab-size", "300"], "no such file"),
    ("empty", ["--input", "{tmp}/empty", "--vocab-size", "300"], "empty corpus"),
    ("key", ["--input", "{tmp}/a.jsonl", "--vocab-size", "300"], "no key 'text'"),
    ("vocab", ["--input", "{tmp}/a.jsonl", "--json-key", "body", "--vocab-size", "100"],
     "at least 257"),
    ("tokenizer", ["--input", "{tmp}/a.jsonl", "--tokenizer", "{tmp}/tok.json"], "no such file"),
])
def test_prepare_bad_input_is_one_line_exit_2(tmp_path, capsys, case, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    argv = ["data", "prepare", "--output-prefix", str(tmp_path / "o"),
            *[a.format(tmp=tmp_path) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err


def test_training_checks_the_dataset_before_launch(prepared, tmp_path):
    from megatron_dualpipe.config.data_files import check_indexed_data

    base = ["data.kind=indexed", f"data.path={prepared}"]
    check_indexed_data(load_recipe("recipes/tiny_moe_cpu.yaml", [*base, "model.vocab_size=300"]))
    with pytest.raises(UserError, match="has 300 ids but model.vocab_size=256"):
        check_indexed_data(load_recipe("recipes/tiny_moe_cpu.yaml", base))
    with pytest.raises(UserError, match=r"missing\.bin/\.idx not found"):
        check_indexed_data(load_recipe("recipes/tiny_moe_cpu.yaml", [
            "data.kind=indexed", f"data.path={tmp_path}/missing"]))
    with pytest.raises(UserError, match="needs data.path"):
        check_indexed_data(load_recipe("recipes/tiny_moe_cpu.yaml", ["data.kind=indexed"]))


def test_validation_and_training_samples_come_from_their_own_documents(prepared, tmp_path):
    """Megatron's split by document: with "2,1,0" the first two documents train and the third
    validates. Letters and digits never share a byte-level token, so each split's samples
    hold only its own documents' tokens (and end-of-document)."""
    import torch

    from megatron_dualpipe.data.gpt_dataset import GPTSamples, build_gpt_datasets

    jsonl = tmp_path / "split.jsonl"
    texts = ["abcdefg" * 30, "hijklmn" * 30, "0123456789" * 30]
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prefix = str(tmp_path / "split")
    assert main(["data", "prepare", "--input", str(jsonl), "--output-prefix", prefix,
                 "--tokenizer", f"{prepared}.tokenizer.json"]) == 0
    docs = _read(prefix)
    recipe = load_recipe("recipes/tiny_moe_cpu.yaml", [
        "data.kind=indexed", f"data.path={prefix}", "data.split='2,1,0'",
        "model.vocab_size=300", "model.seq_length=8"])
    train, valid = build_gpt_datasets(recipe, 16, 8)
    allowed = {"train": set(docs[0] + docs[1]), "valid": set(docs[2])}
    assert not (set(docs[0] + docs[1]) & set(docs[2][:-1]))
    for name, dataset in (("train", train), ("valid", valid)):
        for i in range(8):
            sample = GPTSamples(dataset).sample(i)
            assert sample.dtype == torch.long and sample.numel() == 9
            assert set(sample.tolist()) <= allowed[name], (name, i)


def test_weighted_blend_draws_from_each_dataset_by_weight(prepared, tmp_path):
    """data.path as Megatron's weighted list: Megatron's BlendedDataset gives each dataset its
    share of the samples (letters-only vs digits-only datasets tell the sources apart)."""
    from megatron_dualpipe.data.gpt_dataset import GPTSamples, build_gpt_datasets

    prefixes = {}
    for name, texts in (("letters", ["abcdefg" * 40, "hijklmn" * 40]),
                        ("digits", ["0123456789" * 40, "9876543210" * 40])):
        jsonl = tmp_path / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        prefixes[name] = str(tmp_path / name)
        assert main(["data", "prepare", "--input", str(jsonl), "--output-prefix",
                     prefixes[name], "--tokenizer", f"{prepared}.tokenizer.json"]) == 0
    letters = set(sum(_read(prefixes["letters"]), []))
    digits = set(sum(_read(prefixes["digits"]), []))
    recipe = load_recipe("recipes/tiny_moe_cpu.yaml", [
        "data.kind=indexed", f"data.path=[0.25, {prefixes['letters']}, 0.75, {prefixes['digits']}]",
        "data.split='1,0,0'", "model.vocab_size=300", "model.seq_length=8"])
    train, valid = build_gpt_datasets(recipe, 40, 0)
    assert valid is None
    samples = [set(GPTSamples(train).sample(i).tolist()) for i in range(40)]
    from_letters = sum(s <= letters for s in samples)
    from_digits = sum(s <= digits for s in samples)
    assert from_letters + from_digits == 40
    assert from_letters == 10 and from_digits == 30
