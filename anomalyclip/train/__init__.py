"""Training: the paper's glocal finetune of the prompts (:func:`~anomalyclip.train.finetune.finetune`),
its losses and the frozen-feature cache. Import the submodules directly; this package imports nothing
on its own."""
