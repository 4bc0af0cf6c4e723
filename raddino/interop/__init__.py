"""Interoperability: import DINOv2 / timm / HF transformers / RAD-DINO weights to continue pretraining, and export
a run's teacher to safetensors, timm, HF transformers and Meta's DINOv2 layout (docs/INTEROP.md).

* :mod:`raddino.interop.files` -- reading / writing weight files without executing code;
* :mod:`raddino.interop.formats` -- key maps between raddino and the other layouts (backbone and DINO head);
* :mod:`raddino.interop.source` -- recognise and read a source, describe its architecture;
* :mod:`raddino.interop.load` -- check ``model.*`` against a source, load it into student and teacher;
* :mod:`raddino.interop.runs` -- read a run's teacher from its DCP checkpoint;
* :mod:`raddino.interop.export` / :mod:`raddino.interop.modelcard` -- the exporters and the model card.
"""

from raddino.interop.export import EXPORT_FORMATS, export_run
from raddino.interop.load import ImportReport, check_model_config, init_meta_arch, resolve_pos_embed_interp
from raddino.interop.source import IMPORT_FORMATS, Source, SourceInfo, inspect_source, read_source

__all__ = [
    "EXPORT_FORMATS",
    "IMPORT_FORMATS",
    "ImportReport",
    "Source",
    "SourceInfo",
    "check_model_config",
    "export_run",
    "init_meta_arch",
    "inspect_source",
    "read_source",
    "resolve_pos_embed_interp",
]
