"""The applications: the command line and what its commands run (serve, bench, launch, export, plots)."""
