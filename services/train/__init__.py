"""Training: the GRPO step loop and everything one run needs around it.

Read ``loop.py`` first: the step on one screen. Then ``sampling.py`` (the one
sampling pipeline, sync and async), ``batch.py`` (one step's groups, rewards
``[B, G]`` and advantages), ``parts.py`` (the Ray edge: all placement policy and
the typed ``LearnerGroup`` handle), ``run.py`` (start-up, resume, records,
checkpoints, stop), ``evaluation.py``, and the run's files and reports
(``run_dir.py``, ``data.py``, ``trackers.py``, ``reporting.py``).
"""
