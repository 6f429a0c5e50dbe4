"""The prediction service (BentoML) and what it needs besides the pipeline stages."""
