"""The command-line tools, installed as console scripts (pyproject.toml) and runnable from a checkout as tools/*.py:

    sedd-prepare   (tools/prepare_data.py)        text, corpora or Megatron indexed datasets -> token shards
    sedd-convert   (tools/convert_checkpoint.py)  consolidate, reshard, shard, to-hub, from-hub, describe
    sedd-evaluate  (tools/evaluate.py)            the ELBO over a split or the paper's zero-shot sets
    sedd-sample    (tools/sample.py)              samples, unconditional or infilled, with metrics

`sedd-train` is `python -m sedd_scale.train` and `sedd-plan` is `python -m sedd_scale.config`; `sedd-lm-eval` runs
lm-evaluation-harness with the `sedd` model (`sedd_scale.apps.lm_eval_adapter`).
"""
