"""Backbone adapters for ``raddino eval``: :mod:`~raddino.eval.adapters.base` (the interface, preprocessing, feature
protocols), one module per family (:mod:`~raddino.eval.adapters.timm`, :mod:`~raddino.eval.adapters.hf`,
:mod:`~raddino.eval.adapters.open_clip`, :mod:`~raddino.eval.adapters.ours`, :mod:`~raddino.eval.adapters.pixels`)
and :mod:`~raddino.eval.adapters.registry` (spec string -> adapter)."""
