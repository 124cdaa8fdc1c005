"""The search engine: the EEP strategy and nevergrad proposers, the archive, the ask/tell loop in batches, exact
checkpoints and resume, scoring on a pool. It knows genomes, scores and checkpoints, no config file or CLI
(the application layer, ``eep.app``, drives it)."""
