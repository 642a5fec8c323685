"""Evaluation of uncertainty scores: metrics, meta classifiers, baselines, protocol, report.

Every score in this package is a *confidence*: larger means "more likely a correct
prediction on an in-distribution input". :mod:`training.evaluation.metrics` and
:mod:`training.evaluation.meta` import no torch, so the fitted meta classifiers and the
metric functions can be used by the service.
"""
