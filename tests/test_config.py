"""Recipe loading and validation (sedd_scale.config), and every recipe shipped in recipes/."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml

from sedd_scale import config as C
from sedd_scale.config import Recipe, RecipeError, cli, from_dict, load_recipe, to_dict

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
GPT2_ABSORB_VOCAB = 50258  # GPT-2 tokens + MASK


def minimal(**sections) -> dict:
    """A small valid raw recipe, with sections replaced/added."""
    raw = {"model": {"hidden_size": 64, "n_heads": 4, "n_blocks": 4, "length": 32},
           "data": {"manifests": ["d/manifest.json"], "seq_len": 32},
           "parallel": {"micro_batch": 2, "global_batch": 8}}
    raw.update(sections)
    return raw


def write(tmp_path, raw) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(raw) -> str:
    with pytest.raises(RecipeError) as e:
        from_dict(Recipe, raw)
    return str(e.value)


# --- the shipped recipes --------------------------------------------------------------------------
def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"cpu-tiny.yaml", "sedd-small.yaml", "sedd-medium.yaml"} <= names
    assert len(names) >= 5, names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_round_trips(path):
    """Every recipe validates, and its resolved form reloads to the same recipe."""
    recipe = load_recipe(path)
    assert from_dict(Recipe, yaml.safe_load(yaml.safe_dump(to_dict(recipe)))) == recipe


def _model_params(m, vocab: int) -> int:
    """Parameter count of the reference DiT (sedd-math section 4) from its sizes."""
    h, c, n = m.hidden_size, m.cond_dim, m.n_blocks
    block = 12 * h * h + 6 * h * c + 13 * h  # adaLN, 2 norms, qkv, out, MLP with biases
    sigma_map = 256 * c + c + c * c + c
    final = h + 2 * h * c + 2 * h + h * vocab + vocab
    return n * block + vocab * h + sigma_map + final


@pytest.mark.parametrize("name, expected", [("sedd-small.yaml", 169_627_218), ("sedd-medium.yaml", 424_477_010)])
def test_paper_recipes(name, expected):
    """The paper's models and hyperparameters; the sizes give the reference's parameter counts."""
    r = load_recipe(REPO / "recipes" / name)
    assert _model_params(r.model, GPT2_ABSORB_VOCAB) == expected == r.model.num_params() - (
        r.model.padded_vocab(1) - GPT2_ABSORB_VOCAB) * (r.model.hidden_size * 2 + 1)  # padding: 2 matrices + bias
    assert (r.parallel.global_batch, r.optim.lr, r.optim.warmup, r.optim.schedule) == (512, 3e-4, 2500, "constant")
    assert (r.optim.eps, r.optim.betas, r.optim.weight_decay, r.optim.grad_clip) == (1e-8, (0.9, 0.999), 0.0, 1.0)
    assert (r.train.ema, r.data.seq_len, r.data.tokenizer) == (0.9999, 1024, "gpt2")
    assert (r.model.graph, r.diffusion.noise, r.diffusion.sampling_eps) == ("absorb", "loglinear", 1e-3)
    assert (r.model.n_blocks, r.model.hidden_size, r.model.n_heads, r.model.dropout) == {
        "sedd-small.yaml": (12, 768, 12, 0.1), "sedd-medium.yaml": (24, 1024, 16, 0.1)}[name]
    assert r.layout(8).grad_accum == {"sedd-small.yaml": 1, "sedd-medium.yaml": 2}[name]  # the reference's 8 GPUs


@pytest.mark.parametrize("name, tp, pp, world", [("sedd-1.3b-pp2.yaml", 1, 2, 16), ("sedd-7b-pp8.yaml", 1, 8, 64)])
def test_multi_node_recipes(name, tp, pp, world):
    """Layouts as advertised (the file name, the sbatch line), and the parameter count stated in the comments
    matches the model; the planner's numbers quoted there are the planner's (tests/test_planner.py checks that
    these layouts are its choice)."""
    from sedd_scale import plan as planner

    path = REPO / "recipes" / name
    r = load_recipe(path)
    assert (r.parallel.tp, r.parallel.pp, r.parallel.zero_stage) == (tp, pp, 1)
    assert f"pp{pp}" in name and (tp == 1) == ("tp" not in name)
    layout = r.layout(world)
    assert layout.dp * layout.micro_batch * layout.grad_accum == 512
    text = path.read_text()
    stated = re.search(r"([\d,]{10,}) parameters at TP=1", text)
    assert stated, "the memory comment states the parameter count"
    assert int(stated[1].replace(",", "")) == _model_params(r.model, GPT2_ABSORB_VOCAB)
    nodes = re.search(r"sbatch --nodes (\d+) --ntasks-per-node (\d+) .* recipes/(\S+)", text)
    assert nodes and int(nodes[1]) * int(nodes[2]) == world and nodes[3] == name
    plan = planner.plan(r, planner.candidate_of(r, layout))
    worst = plan.worst
    assert f"{plan.needed_bytes / 1e9:.1f} " in text and f"{worst.peak / 1e9:.1f} " in text  # e.g. "21.8 / 18.6"
    assert f"bubble {layout.pp - 1}/{layout.grad_accum + layout.pp - 1} = {plan.bubble:.1%}".replace(".0%", "%") in \
        text.replace("\n# ", " ")



def test_long_sequence_recipe(capsys):
    """sedd-7b-8k: the 7B of sedd-7b-pp8 at 8,192 tokens, TP2 + SP x CP2 x DP16 on 64 GPUs, the tokens per step of
    sedd-7b-pp8; the planner's figures quoted in its comments (64 GPUs, and 1,024 with CP 8 and ZeRO-2) are the
    planner's, and the pre-flight check prints its plan."""
    from sedd_scale import plan as planner

    path = REPO / "recipes" / "sedd-7b-8k.yaml"
    r, seven = load_recipe(path), load_recipe(REPO / "recipes" / "sedd-7b-pp8.yaml")
    assert r.model == dataclasses.replace(seven.model, name="7b-8k", length=8192) and r.data.seq_len == 8192
    assert (r.data.tokenizer, r.model.precision, r.model.graph) == ("gpt2", "bf16", "absorb")
    layout = r.layout(64)
    assert (layout.tp, layout.sp, layout.cp, layout.pp, layout.dp) == (2, True, 2, 1, 16)
    assert r.parallel.global_batch * r.data.seq_len == seven.parallel.global_batch * seven.data.seq_len
    text = " ".join(path.read_text().replace("\n# ", " ").split())
    nodes = re.search(r"sbatch --nodes (\d+) --ntasks-per-node (\d+) .* recipes/(\S+)", text)
    assert nodes and int(nodes[1]) * int(nodes[2]) == 64 and nodes[3] == path.name
    p = planner.plan(r, planner.candidate_of(r, layout))
    assert p.fits and p.needed_bytes < 0.8 * p.gpu.memory_bytes  # a margin
    train = planner.device_bytes(p.worst.training_peak, p.assumptions)
    assert f"{p.needed_bytes / 1e9:.1f} of 80 GB" in text and f"({train / 1e9:.1f} with the CUDA/NCCL" in text
    assert f"Estimated {p.time.total:.3g} s per step" in text and f"MFU {p.mfu:.1%}" in text
    big = load_recipe(path, ["parallel.context_parallel=8", "parallel.zero_stage=2"])
    q = planner.plan(big, planner.candidate_of(big, big.layout(1024)))
    assert f"{q.needed_bytes / 1e9:.1f} GB per GPU, {q.time.total:.3g} s per step" in text
    assert f"MFU {q.mfu:.1%}" in text
    assert cli.main([str(path), "--world-size", "64"]) == 0
    assert "TP2+SP CP2 PP1 DP16 ZeRO-1" in capsys.readouterr().out

def test_cpu_tiny_is_small_and_local():
    r = load_recipe(REPO / "recipes" / "cpu-tiny.yaml")
    assert r.data.prepare and r.data.tokenizer == "byte" and r.model.precision == "fp32"
    assert r.model.num_params() < 2_000_000
    assert r.layout(1).grad_accum * r.parallel.micro_batch == r.parallel.global_batch
    assert r.layout(2).dp == 2  # also runs as two processes on the 2 cores


# --- keys and types --------------------------------------------------------------------------------
def test_unknown_keys_get_a_suggestion_and_the_dotted_path():
    assert error_of(minimal(optim={"lrr": 1e-3})) == "unknown key 'optim.lrr'; did you mean 'optim.lr'?"
    assert "unknown key 'paralel'; did you mean 'parallel'?" in error_of(minimal(paralel={}))
    assert "unknown key 'train.zzz'; known keys: steps, ema, seed" in error_of(minimal(train={"zzz": 1}))


@pytest.mark.parametrize("section, message", [
    ({"train": {"steps": "10"}}, "train.steps: expected an integer, got '10'"),
    ({"train": {"steps": True}}, "train.steps: expected an integer, got True"),
    ({"train": {"steps": 10.5}}, "train.steps: expected an integer, got 10.5"),
    ({"model": {"activation_checkpointing": 1}}, "model.activation_checkpointing: expected true/false, got 1"),
    ({"model": {"precision": "fp16"}}, "model.precision: 'fp16' is not one of ['fp32', 'bf16', 'bf16-mixed']"),
    ({"data": {"tokenizer": "bpe", "manifests": ["a"]}}, "data.tokenizer: 'bpe' is not one of ['gpt2', 'byte']"),
    ({"optim": {"betas": [0.9]}}, "optim.betas: expected 2 items"),
    ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1]: expected a number, got 'x'"),
    ({"optim": 3}, "optim: expected a mapping, got 3"),
    ({"data": {"manifests": "d.json"}}, "data.manifests: expected a list"),
    ({"data": {"manifests": ["a", 2]}}, "data.manifests[1]: expected a string, got 2"),
    ({"data": {"seq_len": 8}}, "missing required key 'data.manifests'"),
    ({"model": [1]}, "model: expected a mapping"),
])
def test_type_errors_name_the_key(section, message):
    assert message in error_of(minimal(**section))


def test_ints_accepted_for_floats_and_null_for_optionals():
    r = from_dict(Recipe, minimal(optim={"lr": 1, "grad_clip": 0}, train={"peak_tflops": None}))
    assert isinstance(r.optim.lr, float) and r.optim.lr == 1.0 and r.optim.grad_clip == 0.0
    assert r.train.peak_tflops is None
    assert from_dict(Recipe, minimal(train={"peak_tflops": 989})).train.peak_tflops == 989.0


def test_section_rules_reraised_with_their_path():
    assert error_of(minimal(optim={"lr": -1.0})) == "optim: lr must be > 0, got -1.0"
    assert "data: weights has 1 entries for 2 manifests" in error_of(
        minimal(data={"manifests": ["a", "b"], "weights": [1.0]}))
    assert "diffusion: geometric noise needs 0 < sigma_min < sigma_max" in error_of(
        minimal(diffusion={"noise": "geometric", "sigma_min": 2.0, "sigma_max": 1.0}))
    assert "parallel: zero_stage must be 0, 1, 2 or 3" in error_of(minimal(parallel={"zero_stage": 4}))


def test_yaml_reads_exponent_floats(tmp_path):
    """PyYAML alone reads `3e-4` as a string; recipes mean a float."""
    assert C.parse_yaml("lr: 3e-4\nx: 1E5\ny: -2e+1\nz: 10\nw: '1e-3'") == {
        "lr": 3e-4, "x": 1e5, "y": -20.0, "z": 10, "w": "1e-3"}
    path = tmp_path / "r.yaml"
    path.write_text("model: {}\ndata: {manifests: [a]}\noptim: {lr: 5e-4}\n")  # model: the small defaults
    assert load_recipe(path).optim.lr == 5e-4


# --- overrides -------------------------------------------------------------------------------------
def test_overrides(tmp_path):
    path = write(tmp_path, minimal())
    r = load_recipe(path, ["optim.lr=1e-4", "parallel.tp=2", "optim.betas=[0.9, 0.95]", "model.precision=bf16",
                           "data.valid=null", "model.dropout=0.2"])
    assert (r.optim.lr, r.parallel.tp, r.optim.betas, r.model.precision) == (1e-4, 2, (0.9, 0.95), "bf16")
    assert r.data.valid is None and r.model.dropout == 0.2
    assert r.optim.warmup == 2500  # untouched keys keep the recipe's / the default value


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("optimm.lr=1", "unknown key 'optimm'; did you mean 'optim'?"),
    ("data.seq_len.x=1", "'data.seq_len' is a value, not a section"),
    ("optim.lr.x=1", "optim.lr: expected a number, got {'x': 1}"),
    ("optim.lr", "not of the form section.key=value"),
    ("train.steps=many", "train.steps: expected an integer, got 'many'"),
])
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(write(tmp_path, minimal()), [override])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(tmp_path / "list.yaml")


# --- layouts ---------------------------------------------------------------------------------------
def test_layout_resolution():
    r = from_dict(Recipe, minimal(parallel={"tp": 2, "pp": 2, "micro_batch": 2, "global_batch": 16}))
    layout = r.layout(8)
    assert (layout.tp, layout.pp, layout.dp, layout.grad_accum) == (2, 2, 2, 4)
    assert layout.describe() == ("world 8 = TP 2 x PP 2 x DP 2 | ZeRO-1 | "
                                 "batch 16 = micro 2 x DP 2 x grad accum 4")


@pytest.mark.parametrize("parallel, world, message", [
    ({"tp": 2, "pp": 2}, 6, "world size 6 is not divisible by tp*pp = 2*2 = 4"),
    ({"micro_batch": 3, "global_batch": 8}, 2, "global_batch=8 is not divisible by micro_batch*dp = 3*2 = 6"),
])
def test_impossible_world_sizes(parallel, world, message):
    r = from_dict(Recipe, minimal(parallel={"micro_batch": 2, "global_batch": 8, **parallel}))
    with pytest.raises(RecipeError, match=re.escape(message)):
        r.layout(world)


@pytest.mark.parametrize("parallel, message", [
    ({"tp": 3}, "parallel.tp=3: tensor-parallel size 3 does not divide n_heads=4: choose one of [1, 2, 4]"),
    ({"pp": 3}, "parallel.pp=3 does not divide model.n_blocks=4: choose pp among [1, 2, 4]"),
    ({"pp": 2, "zero_stage": 2}, "DeepSpeed's pipeline engine supports ZeRO-1 only"),
    ({"pp": 2, "zero_stage": 3}, "use zero_stage 1 or pp 1"),
    ({"distributed_timeout_minutes": 0}, "distributed_timeout_minutes must be >= 1, got 0"),
    ({"zero_reduce_bucket_size": 0}, "parallel.zero_reduce_bucket_size must be an integer number of elements >= 1, "
                                     "got 0; set e.g. parallel.zero_reduce_bucket_size: 200000000"),
    ({"zero_prefetch_bucket_size": -1}, "parallel.zero_prefetch_bucket_size must be an integer number of elements "
                                        ">= 0, got -1"),
    ({"zero_reduce_bucket_size": 5e8}, "parallel.zero_reduce_bucket_size: expected an integer, got 500000000.0"),
    ({"zero_overlap_comm": "yes"}, "parallel.zero_overlap_comm: expected"),
])
def test_impossible_layouts_refused_on_load(parallel, message):
    assert message in error_of(minimal(parallel={"micro_batch": 2, "global_batch": 8, **parallel}))


def test_bf16_weights_need_zero():
    assert "set parallel.zero_stage: 1" in error_of(minimal(model={"hidden_size": 64, "n_heads": 4, "n_blocks": 4,
                                                                     "length": 32, "precision": "bf16"},
                                                              parallel={"zero_stage": 0}))


def test_model_must_match_data():
    """The network's length and vocabulary must be the data's."""
    assert "model.length=32 differs from data.seq_len=64" in error_of(
        minimal(data={"manifests": ["a"], "seq_len": 64}))
    assert "model.num_tokens=50257 does not match data.tokenizer 'byte' (257 tokens): set model.num_tokens: 257" in \
        error_of(minimal(data={"manifests": ["a"], "seq_len": 32, "tokenizer": "byte"}))
    assert "model: model.hidden_size=64 is not divisible by n_heads=3" in error_of(
        minimal(model={"hidden_size": 64, "n_heads": 3, "length": 32}))


def test_zero_2_and_3_allowed_without_pipeline():
    for stage in (0, 1, 2, 3):
        assert from_dict(Recipe, minimal(parallel={"zero_stage": stage})).layout(4).zero_stage == stage


def test_layout_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="ZeRO-1 only"):
        C.Layout(world_size=2, tp=1, pp=2, dp=1, zero_stage=3, micro_batch=1, global_batch=1, grad_accum=1)
    with pytest.raises(ValueError, match="!= world size"):
        C.Layout(world_size=3, tp=1, pp=2, dp=1, zero_stage=1, micro_batch=1, global_batch=1, grad_accum=1)


def test_train_refuses_zero2_with_pipeline_before_any_process_group(capsys):
    """The trainer's entry stops on the recipe, before torch.distributed is touched."""
    import torch.distributed as dist

    from sedd_scale.train import main as train

    code = train.main([str(REPO / "recipes" / "cpu-tiny.yaml"), "--set", "parallel.pp=2", "parallel.zero_stage=2"])
    assert code == 2 and "ZeRO-1 only" in capsys.readouterr().err
    assert not dist.is_initialized()


# --- learning-rate schedule ------------------------------------------------------------------------
def test_lr_schedule():
    o = C.OptimConfig(lr=1.0, warmup=10, schedule="constant")
    assert [o.lr_at(s, 100) for s in (0, 5, 10, 99)] == [0.0, 0.5, 1.0, 1.0]  # the reference: lr*min(step/warmup, 1)
    c = C.OptimConfig(lr=1.0, warmup=10, schedule="cosine", min_lr=0.1)
    assert c.lr_at(10, 110) == 1.0 and math.isclose(c.lr_at(60, 110), 0.55) and math.isclose(c.lr_at(110, 110), 0.1)
    assert c.lr_at(500, 110) == pytest.approx(0.1)  # past the end: the floor
    assert C.OptimConfig(lr=2.0, warmup=0).lr_at(0, 10) == 2.0


def test_cli_prints_layout_plan_and_recipe(capsys):
    assert cli.main([str(REPO / "recipes" / "cpu-tiny.yaml"), "--world-size", "2", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("layout: world 2 = TP 1 x PP 1 x DP 2")
    plan, recipe = out.split("\n---\n")
    assert "plan: H100 SXM (80 GB), TP1 PP1 DP2 ZeRO-0 micro 16" in plan and "needed per GPU (GB)" in plan
    assert yaml.safe_load(recipe)["parallel"]["global_batch"] == 32
    assert cli.main([str(REPO / "recipes" / "cpu-tiny.yaml"), "--world-size", "3", "--set", "parallel.tp=2"]) == 2
    assert "not divisible by tp*pp" in capsys.readouterr().err


def test_cli_warns_and_proposes(capsys):
    """The issue's layouts: 7B TP4 x PP4 at 1024 GPUs (bubble), 7B without TP or PP on one node (memory)."""
    seven = str(REPO / "recipes" / "sedd-7b-pp8.yaml")
    assert cli.main([seven, "--world-size", "1024", "--set", "parallel.tp=4", "parallel.pp=4",
                   "parallel.micro_batch=4"]) == 0
    out = capsys.readouterr().out
    assert "warning: pipeline bubble 60% > 10%" in out and "micro 4 x DP 64 x grad accum 2" in out
    assert cli.main([seven, "--world-size", "8", "--set", "parallel.pp=1"]) == 0
    assert "warning: memory: stage 0 needs" in capsys.readouterr().out
    assert cli.main([seven, "--world-size", "64", "--gpu", "a100", "--propose"]) == 0
    out = capsys.readouterr().out
    assert "plan: A100 SXM 80GB (80 GB)" in out and "of 312 TFLOP/s" in out
    table = out[out.index("layouts fit; the fastest"):].splitlines()
    assert table[2].split()[:5] == ["tp", "sp", "cp", "pp", "dp"] and len(table) == 3 + 10
    # an impossible world size is refused, and the layouts that do exist are still proposed
    assert cli.main([seven, "--world-size", "4", "--propose"]) == 2
    captured = capsys.readouterr()
    assert "not divisible by tp*pp = 1*8" in captured.err and "layouts fit" in captured.out
    with pytest.raises(SystemExit):
        cli.main([seven, "--gpu", "v100"])


def test_packaged_recipes_resolve_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: only the package's copies can answer
    assert to_dict(load_recipe("cpu-tiny")) == to_dict(load_recipe(REPO / "recipes" / "cpu-tiny.yaml"))
    assert sorted(C.recipe.packaged_recipes()) == sorted(p.stem for p in RECIPES)
    with pytest.raises(RecipeError, match=r"no packaged recipe is named so.*'cpu-tiny'"):
        load_recipe("cpu-tinny")
    (tmp_path / "cpu-tiny").write_text("model: {}\n")  # a file of that name wins over the packaged recipe
    with pytest.raises(RecipeError, match="data"):
        load_recipe("cpu-tiny")
