"""The compact pretraining and evaluation suite (MoCo-v2, BYOL, DenseCL) that consumes the loader.

Installed as ``dali_objcrop.train`` (the sources sit at the top of the repository, ``train/``;
``dali_objcrop/train`` links to them).  Entry points, each also a ``dali-objcrop`` subcommand:
:mod:`.pretrain` (torchrun-ready trainer; ``dali-objcrop pretrain``), :mod:`.linear_eval` and
:mod:`.knn_eval` (frozen-backbone evaluation, also importable as functions; ``dali-objcrop
linear-eval`` / ``knn-eval``).  Every one is configured by a dataclass with typed ``--field=value``
flags (:mod:`.config`).
"""
