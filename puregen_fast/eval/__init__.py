"""The evaluation of a defense: the poisons (`poison`), the classifiers (`classifier`), the
metrics and the paper's table (`metrics`), and an experiment end to end (`experiment`)."""
