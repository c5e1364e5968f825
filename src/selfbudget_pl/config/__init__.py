"""Configs, checked before any model or data is loaded: :mod:`~selfbudget_pl.config.checks` (what ``train``,
``selfbudget-eval`` and ``selfbudget generate`` call), :mod:`~selfbudget_pl.config.groups` (the config groups:
which schema checks each node), :mod:`~selfbudget_pl.config.startup` (checks across groups and against the
machine) and :mod:`~selfbudget_pl.config.overrides` (Lightning-style ``--trainer.*`` overrides). The schema
machinery, which constructors use too, is :mod:`selfbudget_pl.schema`."""
