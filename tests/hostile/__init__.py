"""An adversarial corpus: hostile and careless edits of train.py, and the surroundings to run them in.

cases.py   the edits (Case: name, kind, expect, edits applied to the real train.py text)
arena.py   planted secrets, snapshots, process scans, one case run and its checks, the outcome table
"""
