"""The embedded default's own model and task: what runs with no download at all.

``tiny_model`` builds small Qwen2 models with the project's own tokenizer;
``arithmetic`` is the demo task (data, verifier format, the supervised warm-up
that makes the base policy). Ray jobs, tests, benchmarks and examples all use
them, so they are installed with the package rather than kept under examples/.
"""
