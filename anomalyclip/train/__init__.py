"""Training: the paper's glocal finetune of the prompts (:func:`~anomalyclip.train.finetune.finetune`),
its losses, the frozen-feature cache, the ground-truth masks and the checkpoints. Training knows the
model only through :class:`~anomalyclip.train.interface.TrainableModel`. Import the submodules
directly; this package imports nothing on its own."""
