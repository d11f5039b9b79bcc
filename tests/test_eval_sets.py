"""The zero-shot evaluation sets: each distribution format read and detokenized like the reference (expected
strings written by hand from the reference's rules), the blocks, and bad files named with line and format."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from sedd_scale.data.eval_sets import EVAL_SETS, FormatError, parse_datasets, prepare_eval_set

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "eval_formats"

EXPECTED = {
    "lambada": (["lambada_test.jsonl"], [
        '\n"I don\u2019t know," she said. He shook his head and walked away',  # curly double quotes only
        "\nthe cat sat on the mat",
        '\nhe said "yes" and left']),
    "wikitext103": (["wiki.test.raw"], [
        "",  # blank lines stay documents (an EOS alone), as Hugging Face's wikitext rows
        " = Robert Boulter =\n",
        "",
        " Robert Boulter is an English film, television and theatre actor. He had a guest-starring role on the "
        "television series The Bill in 2000.\n",
        " == Career ==\n",
        ' In 2006, he starred (as Tom) in the play "Herons", which ran 1,000 nights at 5.5\u00b0C.\n',
        " The actors'union said 1 members's jobs\n"]),  # the reference's quote rule pairs the two apostrophes
    "ptb": (["ptb.test.txt"], [
        "no it wasn't black monday",
        "the dow fell 1 points to $1 and the company's stock fell / rose ?",
        "the investors' fears # N"]),  # " N " needs a space after it: a line's last N stays
    "1bw": (["news.en.heldout-00000-of-00050"], [
        "The company's shares rose 5 % to $10.50 on Monday.",
        '"It is a great day," he said, citing http://example.com/news (see page 3)!',
        "Prices fell \u00a33 in London."]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_documents_are_detokenized_like_the_reference(name):
    files, expected = EXPECTED[name]
    assert list(EVAL_SETS[name].documents([FIX / f for f in files])) == expected


def test_wikitext2_reads_like_wikitext103_and_dataset_lists_parse():
    assert list(EVAL_SETS["wikitext2"].documents([FIX / "wiki.test.raw"])) == EXPECTED["wikitext103"][1]
    assert parse_datasets("all") == ["lambada", "wikitext2", "ptb", "wikitext103", "1bw"]
    assert parse_datasets("ptb, lambada,ptb") == ["ptb", "lambada"]
    with pytest.raises(ValueError, match="unknown dataset.*'wt2'.*lambada, wikitext2, ptb, wikitext103, 1bw"):
        parse_datasets("ptb,wt2")


@pytest.mark.parametrize("name,file,message", [
    ("lambada", "lambada_no_text.jsonl", 'lambada_no_text.jsonl:2: no string "text" \\(keys \\[\'txt\'\\]\\); '
                                         "expected LAMBADA JSONL"),
    ("lambada", "wiki.test.raw", "wiki.test.raw:2: not JSON .*expected LAMBADA JSONL"),  # line 1 is blank
    ("wikitext103", "wiki_as_json.raw", "wiki_as_json.raw:1: a JSON line where WikiText raw text"),
    ("wikitext2", "wiki.test.tokens", "wiki.test.tokens:4: '<unk>' marks the tokenized WikiText.*pass the raw file"),
    ("ptb", "lambada_test.jsonl", "lambada_test.jsonl:1: a JSON line where Penn Treebank text"),
    ("1bw", "lambada_test.jsonl", "lambada_test.jsonl:1: a JSON line where One Billion Word heldout text"),
])
def test_a_file_out_of_format_names_file_line_and_format(name, file, message):
    with pytest.raises(FormatError, match=message):
        list(EVAL_SETS[name].documents([FIX / file]))


def test_blocks_are_the_concatenated_documents_with_eos_cut_to_the_model_length(tmp_path):
    """Byte tokens: every document + EOS (256), concatenated over two files in order, cut into 16-token blocks,
    the final remainder dropped."""
    from sedd_scale.data.loader import EvalLoader
    from sedd_scale.data.manifest import Manifest

    files = [FIX / "wiki.test.raw", FIX / "wiki.test.raw"]
    manifest = prepare_eval_set("wikitext103", files, tokenizer="byte", seq_len=16, out=tmp_path / "wt")
    stream = [t for doc in EXPECTED["wikitext103"][1] * 2 for t in [*doc.encode("utf-8"), 256]]
    expected = np.array(stream[: len(stream) // 16 * 16]).reshape(-1, 16)
    info = Manifest.load(manifest).splits["test"]
    assert info.num_sequences == len(expected) and info.dropped_tokens == len(stream) % 16
    assert info.num_documents == 2 * len(EXPECTED["wikitext103"][1])
    rows = [b.tokens[b.valid].numpy() for b in EvalLoader(str(manifest), "test", 4, 0, 1)]
    np.testing.assert_array_equal(np.concatenate(rows), expected)


def _tool():
    module = importlib.import_module("sedd_scale.cli.evaluate")
    return module


def test_evaluate_tool_flags_mirror_the_sets():
    tool = _tool()
    assert tuple(tool.EVAL_SET_FLAGS) == tuple(EVAL_SETS)
    assert all(tool.EVAL_SET_FLAGS[n][0] == s.flag for n, s in EVAL_SETS.items())


def test_evaluate_tool_refuses_missing_or_malformed_set_files_in_one_line(tmp_path, capsys):
    """Exit 2 with one error line naming the flag (or the file, line and format), before any process group or
    model: the checkpoint need not even exist."""
    import torch.distributed as dist

    tool = _tool()
    ckpt = str(tmp_path / "no-checkpoint")
    before = dist.is_initialized()
    cases = {
        "--datasets wikitext103 needs its file: pass --wikitext103-file PATH (WikiText raw text":
            ["--datasets", "ptb,wikitext103"],
        "--datasets lambada needs its file: pass --lambada-file PATH": ["--datasets", "all"],
        f'--lambada-file: {FIX / "lambada_no_text.jsonl"}:2: no string "text"':
            ["--datasets", "lambada", "--lambada-file", str(FIX / "lambada_no_text.jsonl")],
        f"--wikitext2-file: {FIX / 'wiki_as_json.raw'}:1: a JSON line where WikiText raw text":
            ["--datasets", "wikitext2", "--data-file", str(FIX / "wiki_as_json.raw")],
        "--data-file stands for one set's flag": ["--datasets", "ptb,1bw", "--data-file", str(FIX / "ptb.test.txt")],
        "--1bw-file given but not requested": ["--datasets", "ptb", "--1bw-file", str(FIX / "ptb.test.txt")],
        "unknown dataset(s) ['lm1b']": ["--datasets", "lm1b"],
        "matches no file": ["--datasets", "1bw", "--1bw-file", str(tmp_path / "news.en.heldout-*")],
    }
    for message, argv in cases.items():
        assert tool.main([ckpt, *argv]) == 2, message
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (message, err)
    assert dist.is_initialized() == before  # no process group was started


def test_the_readme_command_for_all_sets_parses_and_names_every_file():
    from tests.test_readme_commands import command

    argv = command("torchrun", "--nproc-per-node", "8", "tools/evaluate.py", "gpt2-vocab-model", "--datasets", "all")
    args = _tool().parser().parse_args(argv[4:])
    assert parse_datasets(args.datasets) == list(EVAL_SETS)
    assert all(getattr(args, f"{'lm1b' if n == '1bw' else n}_file") for n, s in EVAL_SETS.items() if not s.builtin)
