"""Distributed execution: process groups (`parallel.py`), the DeepSpeed engine (`engine.py`), pipeline stages
(`pipeline.py`) and the step runners the trainer drives them through (`runner.py`)."""
