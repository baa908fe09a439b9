"""The compact pretraining and evaluation suite (MoCo-v2, BYOL, DenseCL) that consumes the loader.

Entry points: ``train/pretrain.py`` (torchrun-ready trainer), ``train/linear_eval.py`` and
``train/knn_eval.py`` (frozen-backbone evaluation, also importable as functions).
"""
