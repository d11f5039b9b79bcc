"""Training: the entry point (`python -m sedd_scale.train`, `main.py`), the run directory's pre-flight
(`run_dir.py`), the trainer loop, layout-independent noising, the EMA, the optimizer guard and metrics.
Kept free of imports so that the entry point can refuse a bad recipe before megatron and DeepSpeed load."""
