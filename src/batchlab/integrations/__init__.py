"""Callbacks that let other training frameworks feed batchlab's measurement core.

`batchlab.integrations.lightning.BatchlabCallback` (PyTorch Lightning, extra ``[lightning]``) and
`batchlab.integrations.keras.BatchlabCallback` (Keras 3, extra ``[keras]``). Each module imports its
framework; importing batchlab alone imports neither.
"""
