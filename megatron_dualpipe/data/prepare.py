"""`data prepare`: text files, directories or JSONL -> a Megatron indexed dataset (.bin/.idx).

Like Megatron-LM's tools/preprocess_data.py: JSONL input holds one document per line under
`--json-key` (default `text`); `--workers` processes tokenize in parallel; every document ends
with the end-of-document token (`--no-append-eod` leaves it out). Other files are one document
each (a directory: every UTF-8 file below it, sorted). The dataset is written with
megatron.core's `IndexedDatasetBuilder` to `PREFIX.bin` and `PREFIX.idx` (the exact prefix,
no `_text_document` suffix), the tokenizer to `PREFIX.tokenizer.json`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from megatron_dualpipe.data import tokenize
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.tokenizer_files import load_tokenizer, tokenizer_path, vocab_size

JSONL_SUFFIXES = (".jsonl", ".json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("prepare", help="tokenize text/JSONL into a Megatron .bin/.idx dataset",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text files, directories (all UTF-8 files below) or .jsonl files")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx and PREFIX.tokenizer.json")
    p.add_argument("--json-key", default="text", help="key of the text in JSONL (default: text)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="FILE", help="a local Hugging Face tokenizer.json")
    tok.add_argument("--vocab-size", type=int, metavar="N",
                     help="train a byte-level BPE with N ids on the input (id 0: end-of-document)")
    p.add_argument("--eod-token", default=None,
                   help="end-of-document token of --tokenizer (default: the first found of "
                   f"{', '.join(tokenize.EOD_NAMES)})")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="end every document with the end-of-document token (default: on)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be >= 1")
    files = collect_files(args.input)
    start = time.perf_counter()
    prefix = args.output_prefix
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        eod = tokenize.eod_id(tokenizer, args.eod_token)
    else:
        tokenize.check_trainable(args.vocab_size)
        _check_not_empty(files, args.json_key)
        print(f"training a byte-level BPE tokenizer ({args.vocab_size} ids) on the input",
              file=sys.stderr, flush=True)
        tokenizer = tokenize.train_bpe(
            (text for text, _ in iter_documents(files, args.json_key)), args.vocab_size)
        eod = tokenize.eod_id(tokenizer, tokenize.TRAINED_EOD)
    vocab = vocab_size(tokenizer)
    docs, tokens = write_dataset(files, args.json_key, tokenizer, eod if args.append_eod else None,
                                 prefix, args.workers)
    if docs == 0:
        _remove_outputs(prefix)
        raise UserError(f"--input {' '.join(args.input)}: empty corpus (no non-empty document)")
    saved = tokenizer_path(prefix)
    if args.tokenizer:
        shutil.copyfile(args.tokenizer, saved)
    else:
        tokenizer.save(str(saved))
    print(f"wrote {prefix}.bin/.idx: {docs:,} documents, {tokens:,} tokens, vocabulary {vocab} "
          f"(end-of-document id {eod}), tokenizer {saved}, in {time.perf_counter() - start:.1f} s")
    print(f"train on it with: --set data.kind=indexed --set data.path={prefix} "
          f"(needs model.vocab_size >= {vocab})")
    return 0


def collect_files(inputs: list[str]) -> list[tuple[Path, bool]]:
    """(file, explicitly named) for every input; directories expand to their files, sorted."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_file():
            files.append((path, True))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
            files.extend((p, False) for p in found)
        else:
            raise UserError(f"--input {name}: no such file or directory")
    return files


def _hidden(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return any(p.startswith(".") or p == "__pycache__" for p in parts)


def iter_documents(files: list[tuple[Path, bool]], json_key: str) -> Iterator[tuple[str, int]]:
    """(text, size in bytes) of every non-empty document, in input order."""
    for path, explicit in files:
        if path.suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, json_key)
            continue
        try:
            data = path.read_bytes()
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            if explicit:
                raise UserError(f"--input {path}: not UTF-8 text") from None
            continue  # a binary file inside a directory
        if text.strip():
            yield text, len(data)


def _jsonl_documents(path: Path, key: str) -> Iterator[tuple[str, int]]:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(f"{path}:{number}: not a JSON line ({exc})") from None
            if not isinstance(obj, dict) or key not in obj:
                keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                raise UserError(f"{path}:{number}: no key {key!r} (found: {keys}); "
                                "choose one with --json-key")
            text = obj[key]
            if not isinstance(text, str):
                raise UserError(f"{path}:{number}: {key!r} is a {type(text).__name__}, not text")
            if text.strip():
                yield text, len(line)


def _check_not_empty(files, json_key: str) -> None:
    if next(iter_documents(files, json_key), None) is None:
        names = ", ".join(str(p) for p, _ in files[:3]) or "no files"
        raise UserError(f"--input: empty corpus (no non-empty document in {names})")


_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode(doc: tuple[str, int]) -> tuple[list[int], int]:
    text, size = doc
    return _worker_tokenizer.encode(text).ids, size


def _encoded(files, json_key, tokenizer, workers: int):
    documents = iter_documents(files, json_key)
    if workers == 1:
        for text, size in documents:
            yield tokenizer.encode(text).ids, size
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with multiprocessing.get_context("spawn").Pool(
            workers, initializer=_init_worker, initargs=(tokenizer.to_str(),)) as pool:
        yield from pool.imap(_encode, documents, chunksize=16)


def write_dataset(files, json_key: str, tokenizer, eod: int | None, prefix: str,
                  workers: int) -> tuple[int, int]:
    """Tokenize every document into PREFIX.bin/.idx; returns (documents, tokens)."""
    import numpy as np
    from tqdm import tqdm

    builder_cls, dtype = _builder(vocab_size(tokenizer))
    builder = builder_cls(f"{prefix}.bin", dtype=dtype)
    docs = tokens = nbytes = 0
    start = time.perf_counter()
    with tqdm(desc="tokenizing", unit=" docs", file=sys.stderr, mininterval=0.5) as bar:
        for ids, size in _encoded(files, json_key, tokenizer, workers):
            if eod is not None:
                ids.append(eod)
            if not ids:
                continue
            builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
            docs, tokens, nbytes = docs + 1, tokens + len(ids), nbytes + size
            bar.update(1)
            if docs % 64 == 0:
                rate = nbytes / 1e6 / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{rate:.2f} MB/s", refresh=False)
        rate = nbytes / 1e6 / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{rate:.2f} MB/s")
    builder.finalize(f"{prefix}.idx")
    return docs, tokens


def _builder(vocab: int):
    """megatron.core's builder and the token dtype it would choose for `vocab` ids."""
    import warnings

    with warnings.catch_warnings():  # megatron.core's import-time notes about TE/apex
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return IndexedDatasetBuilder, DType.optimal_dtype(vocab)


def _remove_outputs(prefix: str) -> None:
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)
