"""The locked part of hybrid: data, tokenizer, loader, the val_bpb metric and the trial runner.

Agents never edit this package. train.py talks to it only through `harness.api`.
"""
