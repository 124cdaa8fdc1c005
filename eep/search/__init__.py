"""The EEP search: the evolutionary strategy over genomes (the Hydra app, ask/tell loop and resume are to come)."""
