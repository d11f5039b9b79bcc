"""Prompt/response (SFT) preparation: rows equal to an independent byte-level oracle (prompt, response, EOS,
EOS padding, prompt length), decoded text equal to the input, the loaders' guarantees for conditional rows
(every row once per epoch, global shuffle, exact resume, CRC32 damage caught), --verify, worker-count
independent bytes, and bad input as one line naming file and line, exit 2, nothing written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sedd_scale.cli.prepare_data import main
from sedd_scale.data.loader import EvalLoader, LoaderConfig, TokenLoader
from sedd_scale.data.manifest import Manifest
from sedd_scale.data.pairs import PairsConfig, prepare_pairs, read_pairs
from sedd_scale.data.prompts import split_prompts
from sedd_scale.data.shards import ShardError
from sedd_scale.data.tokenizer import ByteTokenizer
from tests.test_data_loader import resumed_stream, take
from tests.test_data_prepare import run_cli, snapshot, split_tokens

SEQ_LEN, EOS = 24, 256
TEMPLATE = "Q: {prompt}\nA: "  # 7 bytes around the prompt
PER_SHARD = 20  # shard_tokens 500 // row width 25
WORDS = ["a", "bc", "déf", "中", "😀", "gh", "ij"]


def pairs(n: int, seed: int) -> list[dict[str, str]]:
    """Pairs with non-ASCII text whose responses sometimes do not fit (a prompt at most 15 bytes + 7 of template)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = f"{i}" + "".join(rng.choice(WORDS, size=rng.integers(0, 3)))
        response = " ".join(rng.choice(WORDS, size=rng.integers(1, 8)))
        out.append({"prompt": prompt, "response": response, "id": i})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def oracle(items: list[dict[str, str]]) -> tuple[np.ndarray, int]:
    """Expected rows (n, SEQ_LEN + 1) from the UTF-8 bytes (not the tokenizer), and the response bytes cut."""
    rows, cut = [], 0
    for item in items:
        prompt = list(TEMPLATE.replace("{prompt}", item["prompt"]).encode("utf-8"))
        response = list(item["response"].encode("utf-8")) + [EOS]
        room = SEQ_LEN - len(prompt)
        cut += max(0, len(response) - room)
        rows.append(prompt + response[:room] + [EOS] * (room - len(response[:room])) + [len(prompt)])
    return np.array(rows, dtype=np.int64), cut


def config(out: Path, **kw) -> PairsConfig:
    return PairsConfig(out, tokenizer="byte", seq_len=SEQ_LEN, valid_fraction=0.1, workers=1, seqs_per_sample=4,
                       shard_tokens=500, progress=False, template=TEMPLATE, **kw)


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> dict:
    """300 pairs prepared in-process: 270 train rows in 14 shards of 20, every 10th pair (30) held out."""
    root = tmp_path_factory.mktemp("sft")
    items = pairs(300, seed=0)
    src = write_jsonl(root / "pairs.jsonl", items)
    prepare_pairs(read_pairs([src], template=TEMPLATE), config(root / "d"), {"pairs": [str(src)]})
    held = np.arange(300) % 10 == 9
    train, valid = [items[i] for i in np.flatnonzero(~held)], [items[i] for i in np.flatnonzero(held)]
    return {"root": root, "src": src, "dir": root / "d", "manifest": str(root / "d" / "manifest.json"),
            "train": train, "valid": valid}


def row_key(row) -> tuple[int, ...]:
    return tuple(int(x) for x in row)


def test_rows_are_prompt_response_eos_padding_and_decode_to_the_input(sft):
    m = Manifest.load(sft["manifest"])
    assert m.conditional and m.row_width == SEQ_LEN + 1 and m.seq_len == SEQ_LEN
    for name in ("train", "valid"):
        expected, cut = oracle(sft[name])
        got = split_tokens(m, name).reshape(-1, SEQ_LEN + 1)  # parsed as tar files, not through the layout
        assert np.array_equal(got, expected)
        split = m.splits[name]
        assert (split.num_sequences, split.num_documents, split.dropped_tokens) == (len(expected), len(expected), cut)
    assert len(m.splits["train"].shards) == 14 and cut > 0  # some responses were cut: the fixture tests truncation
    tok = ByteTokenizer()
    tokens, given = split_prompts(torch.from_numpy(split_tokens(m, "train").reshape(-1, SEQ_LEN + 1).astype(np.int64)),
                                  SEQ_LEN)
    whole = 0
    for item, row, mask in zip(sft["train"], tokens.tolist(), given):
        p = int(mask.sum())
        assert mask[:p].all() and tok.decode(row[:p]) == TEMPLATE.replace("{prompt}", item["prompt"])
        response = row[p:]
        if EOS in response:  # it fit: the response, then EOS to the end
            end = response.index(EOS)
            assert bytes(response[:end]).decode("utf-8") == item["response"] and set(response[end:]) == {EOS}
            whole += 1
        else:  # cut at seq_len: a prefix of the response's bytes
            assert item["response"].encode("utf-8").startswith(bytes(response))
    assert 0 < whole < len(sft["train"])
    assert m.source["prompt_field"] == "prompt" and m.source["template"] == TEMPLATE


def test_token_loader_reads_every_row_once_per_epoch_shuffled_and_resumes_exactly(sft):
    cfg = LoaderConfig([sft["manifest"]], seq_len=SEQ_LEN, micro_batch=5, seed=1, global_batch=15)
    loader = TokenLoader(cfg)
    assert loader.conditional and loader.sequences_per_epoch == [270]
    epoch = take(loader, 54)  # 18 global batches of 15 = 270 rows
    assert all(b.shape == (5, SEQ_LEN + 1) and b.dtype == torch.int64 for b in epoch)
    expected, _ = oracle(sft["train"])
    index = {row_key(r): i for i, r in enumerate(expected)}
    got = [index[row_key(r)] for b in epoch for r in b]  # a KeyError: a row that was never written
    assert sorted(got) == list(range(270))  # rows read == rows written, each once
    for step in range(3):  # a step's 15 rows come from blocks of several shards
        assert len({i // PER_SHARD for i in got[15 * step:15 * step + 15]}) >= 3
    tokens, given = split_prompts(epoch[0], SEQ_LEN)
    assert torch.equal(given.sum(1), epoch[0][:, -1]) and torch.equal(tokens, epoch[0][:, :SEQ_LEN])
    reference = take(TokenLoader(cfg), 70)  # past the epoch's end
    assert all(torch.equal(a, b) for a, b in zip(resumed_stream(cfg, [2, 25, 31, 12]), reference, strict=True))


def test_eval_loader_gives_prompt_masks_and_pads_without_prompts(sft):
    loader = EvalLoader(sft["manifest"], "valid", 4)
    assert loader.conditional and loader.num_sequences == 30
    batches = list(loader)
    expected, _ = oracle(sft["valid"])
    tokens = torch.cat([b.tokens for b in batches])
    given = torch.cat([b.given for b in batches])
    valid = torch.cat([b.valid for b in batches])
    assert valid.tolist() == [True] * 30 + [False] * 2
    assert torch.equal(tokens[:30], torch.from_numpy(expected[:, :SEQ_LEN]))
    assert torch.equal(given[:30].sum(1), torch.from_numpy(expected[:, SEQ_LEN])) and not given[30:].any()
    assert (given[:30].long().diff(dim=1) <= 0).all()  # a prefix: the prompt comes first


def test_damage_is_caught_by_crc_on_read_and_by_verify(sft, tmp_path, capsys):
    assert main(["--verify", sft["manifest"]]) == 0
    damaged = tmp_path / "d"
    shutil.copytree(sft["dir"], damaged)
    m = Manifest.load(damaged / "manifest.json")
    shard = damaged / "train-000003.tar"
    data = bytearray(shard.read_bytes())
    data[int(m.layout.row_offsets([6])[0]) + 2 * SEQ_LEN] ^= 0x01  # the stored prompt length of sequence 6
    shard.write_bytes(bytes(data))
    cfg = LoaderConfig([str(damaged / "manifest.json")], seq_len=SEQ_LEN, micro_batch=5, global_batch=15)
    with pytest.raises(ShardError, match=rf"sequence 6 of shard {shard} \(sample 000000000064\) fails its CRC32"):
        take(TokenLoader(cfg), 54)
    capsys.readouterr()
    assert main(["--verify", str(damaged / "manifest.json")]) == 1
    assert f"BAD train: sha256 mismatch for shard {shard}" in capsys.readouterr().out


def test_cli_bytes_do_not_depend_on_workers_and_valid_pairs_are_the_valid_split(sft, tmp_path):
    out = tmp_path / "d"
    r = run_cli("--pairs", str(sft["src"]), "--template", "Q: {prompt}\\nA: ", "--tokenizer", "byte", "--seq-len",
                str(SEQ_LEN), "--valid-fraction", "0.1", "--workers", "2", "--seqs-per-sample", "4",
                "--shard-tokens", "500", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert snapshot(out) == snapshot(sft["dir"])  # same bytes as one in-process worker
    assert "train: 270 pairs -> 270 sequences of 24" in r.stdout and "responses truncated: " in r.stdout
    extra = pairs(7, seed=5)
    valid = write_jsonl(tmp_path / "v.jsonl", [{"q": p["prompt"], "a": p["response"]} for p in extra])
    train = write_jsonl(tmp_path / "t.jsonl", [{"q": p["prompt"], "a": p["response"]} for p in sft["train"][:30]])
    assert main(["--pairs", str(train), "--valid-pairs", str(valid), "--prompt-field", "q", "--response-field", "a",
                 "--template", "Q: {prompt}\\nA: ", "--tokenizer", "byte", "--seq-len", str(SEQ_LEN),
                 "--workers", "1", "--no-progress", "--out", str(tmp_path / "v")]) == 0
    m = Manifest.load(tmp_path / "v" / "manifest.json")
    assert np.array_equal(split_tokens(m, "valid").reshape(-1, SEQ_LEN + 1), oracle(extra)[0])
    assert np.array_equal(split_tokens(m, "train").reshape(-1, SEQ_LEN + 1), oracle(sft["train"][:30])[0])
    assert m.source["valid_pairs"] == [str(valid)] and m.source["response_field"] == "a"


BAD = [  # (a JSONL line, the line's problem)
    ('{"prompt": "hi", "response": ""}', "the response ('response') is empty"),
    ('{"prompt": "hi", "response": "  \\n"}', "the response ('response') is empty"),
    ('{"prompt": "' + "x" * 17 + '", "response": "ok"}',
     "the prompt is 24 tokens, which leaves no room for the response in --seq-len 24: raise --seq-len"),
    ('{"question": "hi", "response": "ok"}',
     "no field 'prompt' (keys: ['question', 'response']): name the field with --prompt-field"),
    ('{"prompt": "hi"}', "no field 'response' (keys: ['prompt']): name the field with --response-field"),
    ('{"prompt": 3, "response": "ok"}', "field 'prompt' is a number, not a string"),
    ('{"prompt": "hi", "response": ["ok"]}', "field 'response' is an array, not a string"),
    ('{"prompt": "hi", "response": ', "not valid JSON"),
    ('["hi", "ok"]', "an array, not a JSON object"),
]


@pytest.mark.parametrize("line, problem", BAD)
def test_bad_pairs_are_one_line_naming_file_and_line_and_nothing_is_written(tmp_path, capsys, line, problem):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "fine", "response": "ok"}\n\n' + line + "\n", encoding="utf-8")
    args = ["--pairs", str(src), "--template", TEMPLATE, "--tokenizer", "byte", "--seq-len", str(SEQ_LEN),
            "--workers", "1", "--no-progress", "--out"]
    assert main([*args, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {src}:3: {problem}" + err.split(problem, 1)[1] and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]  # no dataset, no temporary sibling


def test_bad_input_keeps_an_old_dataset_and_prompts_that_just_fit_are_cut(tmp_path, capsys):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "x" * 16, "response": "yz"}] * 3)  # P = 23 of 24
    out = tmp_path / "out"
    args = ["--template", TEMPLATE, "--tokenizer", "byte", "--seq-len", str(SEQ_LEN), "--workers", "1",
            "--valid-fraction", "0", "--no-progress", "--out", str(out)]
    assert main(["--pairs", str(ok), *args]) == 0
    rows = split_tokens(Manifest.load(out / "manifest.json"), "train").reshape(-1, SEQ_LEN + 1)
    assert rows[:, -2:].tolist() == [[ord("y"), 23]] * 3  # one response position: its first token
    assert "responses truncated: 3 (6 tokens cut)" in capsys.readouterr().out
    before = snapshot(out)
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "caf\xe9", "response": "ok"}\n')
    assert main(["--pairs", str(ok), str(tmp_path / "bad.jsonl"), "--overwrite", *args]) == 2
    assert f"error: {tmp_path / 'bad.jsonl'}:1 is not UTF-8 text" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["--pairs", str(ok), "--valid-pairs", str(empty), "--overwrite", *args]) == 2
    assert f"valid split: ['{empty}'] hold no prompt/response pairs" in capsys.readouterr().err
    assert main(["--pairs", str(ok), "--template", "no placeholder", "--overwrite", *args[2:]]) == 2
    assert "has no {prompt}" in capsys.readouterr().err
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.jsonl",
                                                                                       "ok.jsonl", "out"]


def test_the_readme_pairs_command_runs_as_written_and_prints_its_summary(tmp_path, monkeypatch, capsys):
    import re

    from tests.test_readme_commands import ROOT, command, substitute

    argv = substitute(command("python", "tools/prepare_data.py", "--pairs"), {"--out": str(tmp_path / "sft")})
    monkeypatch.chdir(ROOT)  # the example file's path is relative to the checkout
    assert main([*argv[2:], "--workers", "1", "--no-progress"]) == 0
    shown = re.search(r"```\n(train: .*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)[1]
    out = capsys.readouterr().out
    assert all(line in out for line in shown.splitlines()), out
    m = Manifest.load(tmp_path / "sft" / "manifest.json")
    assert m.conditional and m.source["template"] == "Question: {prompt}\nAnswer: "
