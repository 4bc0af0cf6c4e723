"""Evaluation suite (``raddino eval``): frozen-feature probes, kNN and fine-tuning over many backbones.

Modules: :mod:`~raddino.eval.metrics` (metrics + bootstrap CIs), :mod:`~raddino.eval.linear` (logistic / ridge
probes), :mod:`~raddino.eval.knn`, :mod:`~raddino.eval.datasets` (one module per dataset kind and a kind registry),
:mod:`~raddino.eval.adapters` (backbone adapters and the spec registry), :mod:`~raddino.eval.features` (batched,
cached extraction), :mod:`~raddino.eval.finetune`, :mod:`~raddino.eval.suite` (YAML suites),
:mod:`~raddino.eval.runner`, :mod:`~raddino.eval.report` and :mod:`~raddino.eval.bench` (speed benchmark). See
``docs/EVAL.md``.
"""
