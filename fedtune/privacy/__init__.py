"""Differential privacy: the local DP-SGD run, the persistent ledger, the accountant."""
