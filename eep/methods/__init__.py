"""The post-training alternatives to the EEP search as a library: each method returns a :class:`MethodResult`.

``compute(name, model, materializer, calibration, num_kept=E', top_k=k')`` runs a method from :data:`METHODS`;
``applied(materializer, result)`` makes the model compute a result and restores it bit-exactly;
``export_result(...)`` writes it through :func:`eep.export.export`. Algorithms: docs/methods.md section 5.
"""
from eep.methods.registry import (METHOD_INFO, METHODS, MethodError, MethodInfo, compute, method_names,
                                  register)
from eep.methods.result import ExpertRewrite, MethodResult, applied, export_result
from eep.methods import enumeration, merging, selection, skipping, svd  # noqa: F401,E402  (register the methods)
from eep.methods.calibration import calibration_batch, mixed_skills_texts  # noqa: E402

__all__ = ["METHODS", "METHOD_INFO", "MethodInfo", "method_names", "MethodError", "compute", "register",
           "MethodResult", "ExpertRewrite", "applied", "export_result", "calibration_batch", "mixed_skills_texts"]
