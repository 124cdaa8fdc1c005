"""The application layer: a config in, a run folder out; the CLIs and the Python entry points are thin users of it.

``eep.settings`` validates a composed config once, before any model loads; :mod:`eep.app.session` loads the model,
tokenizer and materialiser a config names (once) and builds its evaluators; :mod:`eep.app.runfolder` owns a run
folder's config, hash and resume; :mod:`eep.app.search` runs ``eep-search``, :mod:`eep.app.compare` ``eep-compare``,
:mod:`eep.app.report` writes what they report. Layers and data path: docs/architecture.md.
"""
