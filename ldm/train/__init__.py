"""The training wing: what ``python main.py`` runs.

``cli`` (the parser and ``main``), ``flags`` (the flag table), ``run_config`` (flags -> settled config),
``training`` (data, model, trainer -> fit), ``trainer_args``, ``dreambooth``, ``callbacks``,
``run_log``, ``run_metrics`` and ``validation``. Scripts that only sample, export or evaluate do not
import it.
"""
