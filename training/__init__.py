"""Offline pipeline: data, the paper's CNN ensemble, scorer export, evaluation, bundles."""
