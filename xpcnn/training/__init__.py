"""Training: the step, the settings, the loop, run directories and the one-call library entry points."""
