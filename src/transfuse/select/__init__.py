"""Transferability metrics: score how well a pre-trained model's features (or predictions) suit a target
classification task, without fine-tuning. Higher is better for every metric.

===================== ======================================== ==========================================
function              inputs                                   paper
===================== ======================================== ==========================================
:func:`logme`         features [N, D], labels [N]              You et al., ICML 2021
:func:`leep`          source probabilities [N, Z], labels      Nguyen et al., ICML 2020
:func:`nleep`         features, labels                         Li et al., CVPR 2021
:func:`nce`           hard source labels [N], labels           Tran et al., ICCV 2019
:func:`h_score`       features, labels                         Bao et al., ICIP 2019
:func:`shrinkage_h_score` features, labels                     Ibrahim et al., ECML-PKDD 2022
:func:`gbc`           features, labels                         Pándy et al., CVPR 2022
:func:`transrate`     features, labels                         Huang et al., ICML 2022
:func:`sfda`          features, labels                         Shao et al., ECCV 2022
:func:`tmi`           features, labels                         Xu & Kang, ICCV 2023
===================== ======================================== ==========================================

Inputs are numpy arrays or torch tensors; labels may be any hashable values (remapped to ``0..C-1``). Bad
inputs raise :class:`SelectionInputError`. See ``docs/selection.md`` for formulas and the differences from the
reference implementations.
"""

from __future__ import annotations

from transfuse.select._validate import SelectionInputError
from transfuse.select.gbc import gbc
from transfuse.select.h_score import h_score, shrinkage_h_score
from transfuse.select.leep import leep, nleep
from transfuse.select.logme import logme
from transfuse.select.nce import nce
from transfuse.select.sfda import sfda
from transfuse.select.tmi import tmi
from transfuse.select.transrate import transrate

__all__ = [
    "SelectionInputError",
    "gbc",
    "h_score",
    "leep",
    "logme",
    "nce",
    "nleep",
    "sfda",
    "shrinkage_h_score",
    "tmi",
    "transrate",
]
