"""Configs, checked before any model or data is loaded: :mod:`~selfbudget_pl.config.checks` (what ``train``,
``selfbudget-eval`` and ``selfbudget generate`` call), :mod:`~selfbudget_pl.config.groups` (a schema per config
group), :mod:`~selfbudget_pl.config.schema` (the schema machinery and :class:`ConfigError`),
:mod:`~selfbudget_pl.config.startup` (checks across groups and against the machine) and
:mod:`~selfbudget_pl.config.overrides` (Lightning-style ``--trainer.*`` overrides)."""
