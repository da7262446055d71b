"""Prompt data: the DataModule, prompt templates, packaged benchmarks, the synthetic task."""
