"""Labelled evaluation datasets for ``raddino eval``: :mod:`~raddino.eval.datasets.base` (images, splits, the common
spec fields, split helpers), one module per kind with its spec and loader (:mod:`~raddino.eval.datasets.medmnist`
``.npz``, :mod:`~raddino.eval.datasets.folder` class-subfolder trees, :mod:`~raddino.eval.datasets.csv` manifests,
:mod:`~raddino.eval.datasets.shards` labelled WebDataset shards; the last two share
:mod:`~raddino.eval.datasets.rows`) and :mod:`~raddino.eval.datasets.registry` (kind -> spec class and loader,
``load_dataset``). See ``docs/EVAL.md`` for the layouts and the fields of each kind."""
