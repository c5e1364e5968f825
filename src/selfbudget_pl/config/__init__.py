"""Configs, checked before any model or data is loaded: :mod:`~selfbudget_pl.config.checks` (what ``train``,
``selfbudget-eval`` and ``selfbudget generate`` call), :mod:`~selfbudget_pl.config.groups` (the config groups:
which schema checks each node), :mod:`~selfbudget_pl.config.startup` (checks across groups and against the
machine) and :mod:`~selfbudget_pl.config.overrides` (Lightning-style ``--trainer.*`` overrides). The schema
machinery, which constructors use too, is :mod:`selfbudget_pl.schema`."""

from omegaconf import OmegaConf

from selfbudget_pl.checkpoints import packaged_checkpoint

# ``${packaged_checkpoint:PACKAGE,FILE}`` in a config: the HF folder converted from a GGUF file a package ships
# (configs/model/smollm2_135m.yaml). Registered with the package, which every entry point imports before it
# resolves a config.
OmegaConf.register_new_resolver("packaged_checkpoint", packaged_checkpoint, replace=True)
