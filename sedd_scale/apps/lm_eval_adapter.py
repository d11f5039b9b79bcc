"""A SEDD model in EleutherAI's lm-evaluation-harness (`lm-eval`, the `eval` extra), registered as model `sedd`.

    python -m sedd_scale.apps.lm_eval_adapter --model sedd --model_args pretrained=DIR,mc_draws=8,seed=0,steps=128 \\
        --batch_size 8 --device cuda --tasks lambada_openai
    # from Python: import sedd_scale.apps.lm_eval_adapter, then lm_eval.simple_evaluate(model="sedd", ...)

lm-eval finds models only in its registry and has no plugin hook, so the plain `lm_eval` command does
not know `sedd`: this module registers it on import and, run with `-m`, hands its command line to
lm-eval's own (every lm-eval flag works, `--include_path` for local tasks included).

DIR is a hub or consolidated directory (`sedd_scale.pretrained.load_pretrained`); its vocabulary picks
the tokenizer (50257: GPT-2, 257: bytes). model_args: `mc_draws` (Monte-Carlo t per sequence, >= 2,
split into replicates as in tools/evaluate.py), `seed`, `steps` / `predictor` (generation),
`max_gen_toks` (default 256). The batch size (sequences per forward) and the device come from lm-eval's
own `--batch_size` and `--device` (its command line passes both to every model, default 1 and cuda:0,
so they cannot also be model_args there); from Python, simple_evaluate's batch_size/device or
model_args. Without either: 8 sequences, the GPU if any.

* loglikelihood(context, continuation): minus the conditional ELBO (`diffusion.elbo`, `given`): the
  context tokens are clamped clean and never noised or scored, only the continuation is noised and
  scored, at sequence length len(context) + len(continuation) (no padding). A lower bound on
  log p(continuation | context), in expectation over the draws. A context that does not fit with the
  continuation into the model's length is left-truncated (counted in the log); a continuation longer
  than the model's length is refused. `is_greedy`: absorbing graph: every continuation token is the
  argmax of the model's prediction with the whole continuation masked (noise level at which that
  fraction is masked); uniform graph: no single-token change of the continuation raises the model's
  probability (all log-ratios <= 0 at the clean sequence, t = 1e-3).
* loglikelihood_rolling(text): minus the ELBO of the text's tokens (no EOS added): k whole blocks of
  the model's length through `diffusion.evaluation.evaluate` (the estimator of tools/evaluate.py:
  antithetic stratified draws, the text's blocks one batch), and a remainder of r tokens as the
  conditional ELBO of its r tokens given the L - r tokens before it (lm-eval's "last window keeps a
  full context"). A text shorter than the model's length is one sequence of its own length.
* generate_until(context, {until, max_gen_toks}): the analytic sampler (`diffusion.sampling.sample`)
  with the context clamped as a prefix, at length len(context) + max_gen_toks (context left-truncated
  to fit the model's length); the generated text is cut at the first EOS and the first `until` string.

Randomness comes from the request itself: a loglikelihood row's generator is seeded by (seed, the
sha256 of context and continuation), a rolling text's blocks by (seed, the sha256 of the text), so a
request gets the same number in any batch, order or task mix (requests are batched by length,
`batch_size` per forward). Generation seeds batch b of a call by (seed, b). The Monte-Carlo standard
error of every log-likelihood is kept (`last_stderr`, nats) and its summary logged.
"""
from __future__ import annotations

import hashlib
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sedd_scale.compat  # noqa: F401  (before megatron-core, which load_pretrained imports)

import lm_eval.models  # noqa: F401  (lm-eval's own models stay registered next to ours)
import numpy as np
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from sedd_scale.apps.generation import choose_tokenizer, model_log_score_fn, read_model_config
from sedd_scale.diffusion.elbo import Generators, elbo_per_sequence, replicate_split
from sedd_scale.diffusion.evaluation import evaluate
from sedd_scale.diffusion.sampling import Infill, sample
from sedd_scale.pretrained import load_pretrained

log = logging.getLogger(__name__)


@dataclass
class _Rows:
    """A block of equal-length sequences handed to the ELBO as one batch (lm-eval's Batch contract: .tokens,
    .valid, .index)."""

    tokens: torch.Tensor
    valid: torch.Tensor
    index: int


def request_key(text: str) -> int:
    """A request's text as a number (the first 62 bits of its sha256): its random stream's name."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 2


def _int_arg(name: str, value, minimum: int) -> int:
    """An integer model_arg (lm-eval passes numbers parsed, or strings), at least `minimum`."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"sedd model_args: {name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum or str(number) != str(value).strip():
        raise ValueError(f"sedd model_args: {name} must be an integer >= {minimum}, got {value!r}")
    return number


def rolling_windows(ids: Sequence[int], length: int) -> tuple[list[list[int]], list[int] | None, int]:
    """(whole blocks of `length`, the last window or None, its tokens given): a text of n tokens is n // length
    blocks plus, when n % length = r > 0, the window of its last `length` tokens whose first length - r are
    given; a text shorter than `length` is one window of its own length with nothing given."""
    n = len(ids)
    if n < length:
        return [], (list(ids) if n else None), 0
    blocks = [list(ids[i:i + length]) for i in range(0, n - n % length, length)]
    r = n % length
    return (blocks, list(ids[n - length:]), length - r) if r else (blocks, None, 0)


@register_model("sedd")
class SEDDLM(LM):
    """lm-eval's LM interface over a SEDD checkpoint directory (module docstring)."""

    def __init__(self, pretrained: str, mc_draws: int = 8, seed: int = 0, batch_size: int | str = 8,
                 device: str | None = None, steps: int = 128, predictor: str = "analytic", max_gen_toks: int = 256,
                 tokenizer: str = "auto", max_batch_size: int | None = None):
        super().__init__()
        del max_batch_size  # lm-eval passes it to every model; batches here are fixed-size
        self.mc_draws = _int_arg("mc_draws", mc_draws, 2)
        replicate_split(self.mc_draws)
        self.seed = _int_arg("seed", seed, 0)
        self.batch_size = _int_arg("batch_size", 8 if batch_size in (None, "auto") else batch_size, 1)
        self.steps = _int_arg("steps", steps, 1)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks, 1)
        if predictor not in ("analytic", "euler"):
            raise ValueError(f"sedd model_args: predictor must be analytic or euler, got {predictor!r}")
        self.predictor = predictor
        path = Path(str(pretrained))
        cfg = read_model_config(path, verify=False)  # load_pretrained below checks every file
        self.length, self.num_tokens = cfg.length, cfg.num_tokens
        self.tok = choose_tokenizer(tokenizer, cfg.num_tokens, path)
        if self.tok is None:
            raise ValueError(f"sedd: the model has {cfg.num_tokens} tokens and no tokenizer (none bundled, and none "
                             "its vocabulary implies: gpt2 50257, byte 257): lm-eval tasks are text")
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"sedd: device {device} but CUDA is not available here: pass --device cpu "
                             "(lm-eval's command line defaults to cuda:0)")
        model, self.graph, self.noise = load_pretrained(path, device=device)
        self._device = next(model.parameters()).device
        self.log_score = model_log_score_fn(model)
        self.last_stderr: list[float] = []

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    # -- helpers ---------------------------------------------------------------------------------
    def generator(self, *keys: str | int) -> torch.Generator:
        """The generator of a request (keys: its kind and text) or a generation batch."""
        words = [k if isinstance(k, int) else request_key(k) for k in keys]
        seed = int(np.random.SeedSequence([self.seed, *words]).generate_state(1, np.uint64)[0])
        return torch.Generator(device=self._device).manual_seed(seed)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation; spaces ending the context move to the continuation (lm-eval's
        convention, so that " word" tokenises as it would after the context)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        return self.tok.encode(context), self.tok.encode(continuation)

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Request indices grouped by length (in order of first appearance), `batch_size` per batch."""
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        return [idx[s:s + self.batch_size] for idx in groups.values() for s in range(0, len(idx), self.batch_size)]

    def conditional_elbo(self, rows: list[tuple[list[int], int]], generator: Generators
                         ) -> tuple[np.ndarray, np.ndarray]:
        """(bound, MC variance) per row of equal-length (ids, number of leading tokens given), nats, float64;
        `generator`: one per row, or one for the batch."""
        x0 = torch.tensor([ids for ids, _ in rows], dtype=torch.long, device=self._device)
        given = torch.arange(x0.shape[1], device=self._device)[None, :] < torch.tensor(
            [g for _, g in rows], device=self._device)[:, None]
        bound, var = elbo_per_sequence(self.log_score, self.graph, self.noise, x0, num_samples=self.mc_draws,
                                       generator=generator, given=given)
        return bound.cpu().numpy(), var.cpu().numpy()

    @torch.no_grad()
    def _greedy(self, rows: list[tuple[list[int], int]]) -> list[bool]:
        """Whether each row's free tokens are the model's greedy choice (module docstring)."""
        x0 = torch.tensor([ids for ids, _ in rows], dtype=torch.long, device=self._device)
        free = torch.arange(x0.shape[1], device=self._device)[None, :] >= torch.tensor(
            [g for _, g in rows], device=self._device)[:, None]
        if self.graph.absorb:
            fraction = free.double().mean(1).clamp(1e-3, 1.0)
            x = torch.where(free, torch.full_like(x0, self.graph.mask), x0)
            scores = self.log_score(x, self.noise.total_noise(fraction))[..., : self.num_tokens]
            hit = scores.argmax(-1) == x0
        else:
            t = torch.full((x0.shape[0],), 1e-3, dtype=torch.float64, device=self._device)
            scores = self.log_score(x0, self.noise.total_noise(t))[..., : self.num_tokens]
            hit = scores.max(-1).values <= 0  # the own entry is 0: no other token is more probable there
        return [bool(h) for h in (hit | ~free).all(1).cpu()]

    # -- lm-eval's interface ---------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(-conditional ELBO of the continuation given the context, is_greedy) per request."""
        rows, truncated = [], 0
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            if len(cont) > self.length:
                raise ValueError(f"sedd: a continuation of {len(cont)} tokens exceeds the model's length "
                                 f"{self.length}; it cannot be scored as one sequence")
            keep = self.length - len(cont)
            truncated += len(ctx) > keep
            ctx = ctx[len(ctx) - keep:] if len(ctx) > keep else ctx  # left-truncated to fit
            rows.append((ctx + cont, len(ctx)))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        stderr = [0.0] * len(rows)
        for idx in self._batches([len(ids) for ids, _ in rows]):
            batch = [rows[i] for i in idx]
            if len(batch[0][0]) == batch[0][1]:  # empty continuations: log 1
                for i in idx:
                    out[i] = (0.0, True)
                continue
            gens = [self.generator("loglikelihood", f"{requests[i].args[0]}\0{requests[i].args[1]}") for i in idx]
            bound, var = self.conditional_elbo(batch, gens)
            for i, bnd, v, greedy in zip(idx, bound, var, self._greedy(batch)):
                out[i], stderr[i] = (-float(bnd), greedy), math.sqrt(float(v))
        for req, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        self._report("loglikelihood", stderr, truncated)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """-ELBO of each text: whole model-length blocks plus the conditional remainder (module docstring)."""
        results, stderr = [], []
        loss = _batch_loss(self.log_score, self.graph)
        for req in requests:
            (text,) = req.args
            blocks, last, given = rolling_windows(self.tok.encode(text), self.length)
            nats, variance = 0.0, 0.0
            if blocks:  # evaluate() seeds batch `index` by (seed, index): the text's key is its index
                rows = _Rows(torch.tensor(blocks, dtype=torch.long), torch.ones(len(blocks), dtype=torch.bool),
                             request_key(text))
                est = evaluate(loss, self.graph, self.noise, [rows], draws=self.mc_draws, seed=self.seed,
                               device=self._device)
                nats, variance = est.total_nats, est.mc_variance
            if last is not None:
                bound, var = self.conditional_elbo([(last, given)], [self.generator("rolling-remainder", text)])
                nats, variance = nats + float(bound[0]), variance + float(var[0])
            results.append(-nats)
            stderr.append(math.sqrt(variance))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, -nats)
        self._report("loglikelihood_rolling", stderr, 0)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text sampled after each context (prefix clamped), cut at EOS and at the first `until` string."""
        plans = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            gen = min(_int_arg("max_gen_toks", kwargs.get("max_gen_toks", self.max_gen_toks), 1), self.length)
            ctx = self.tok.encode(context)
            ctx = ctx[len(ctx) - (self.length - gen):] if len(ctx) > self.length - gen else ctx
            plans.append((ctx, gen, until))
        out: list[str] = [""] * len(plans)
        for b, idx in enumerate(self._batches([len(c) + g for c, g, _ in plans])):
            length = len(plans[idx[0]][0]) + plans[idx[0]][1]
            positions = torch.zeros(len(idx), length, dtype=torch.bool)
            tokens = torch.zeros(len(idx), length, dtype=torch.long)
            for row, i in enumerate(idx):
                ctx = plans[i][0]
                positions[row, :len(ctx)] = True
                tokens[row, :len(ctx)] = torch.tensor(ctx, dtype=torch.long)
            x = sample(self.log_score, self.graph, self.noise, (len(idx), length), steps=self.steps,
                       predictor=self.predictor, infill=Infill(positions, tokens), device=self._device,
                       generator=self.generator("generate", b)).cpu()
            for row, i in enumerate(idx):
                ctx, _, until = plans[i]
                ids = x[row, len(ctx):].tolist()
                if self.tok.eos_id in ids:
                    ids = ids[: ids.index(self.tok.eos_id)]
                text = self.tok.decode(ids)
                cut = min((text.find(s) for s in until if s and s in text), default=len(text))
                out[i] = text[:cut]
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _report(self, what: str, stderr: list[float], truncated: int) -> None:
        self.last_stderr = stderr
        if stderr:
            total = math.sqrt(sum(s * s for s in stderr))
            log.info("sedd %s: %d requests, %d draws each; Monte-Carlo stderr per request median %.4g, max %.4g "
                     "nats; of their sum %.4g nats%s", what, len(stderr), self.mc_draws, float(np.median(stderr)),
                     max(stderr), total, f"; {truncated} contexts left-truncated to fit" if truncated else "")


def _batch_loss(log_score: Callable, graph) -> Callable:
    """The evaluator's batch loss from a log-score function: the rows' mean of rate * sum_i score entropy."""
    def loss(x0, x_t, total, rate):
        se = graph.score_entropy(log_score(x_t, total)[..., : graph.dim], total.double(), x_t, x0)
        return float((rate.double() * se.double().sum(-1)).mean())
    return loss


def main() -> None:
    """lm-eval's command line with `sedd` registered (this module imported)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm-eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
