"""User-facing services: the training driver, the CLI and the job API."""
