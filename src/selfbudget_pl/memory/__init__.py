"""The memory plan: what a run holds on each device and each host, computed from the configs and the
model's config (never its weights) before anything loads (:mod:`.architecture`: the model's sizes;
:mod:`.plan`: the terms; :mod:`.fit`: the devices found, the table and the error)."""
