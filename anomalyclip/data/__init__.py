"""Data: readers for MVTec AD, VisA, ``meta.json`` and folder layouts
(:func:`~anomalyclip.data.datasets.load_dataset`), the torch Dataset that reads images and masks
for a model (:class:`~anomalyclip.data.reader.SampleReader`), and synthetic data sets for tests and
demos. Import the submodules directly; this package imports nothing on its own."""
