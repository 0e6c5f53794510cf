"""K-fold cross-validation in one command: fold runs, out-of-fold probabilities, thresholds.

    fasthpa cv --data ROOT --out cv/hpa --folds 5 [any fasthpa train flag]
    torchrun --nproc_per_node=8 -m fasthpa.cv --data ROOT --out cv/hpa --folds 5

The folds are multi-label stratified (``--fold k/K`` of the trainer, seeded by ``--seed``); fold
run k (``CVDIR/fold{k}``) trains on the other folds and is evaluated on fold k, so every train
row gets a probability from a model that never saw it. Those out-of-fold probabilities
(``CVDIR/oof_probs.npz``: ids, probs, labels, in train.csv order) fit the thresholds
(``CVDIR/thresholds.json``) on the whole train set rather than a 5% dev part. ``cv_summary.json``
holds each fold's dev macro F1 and the out-of-fold figures; ``cv.json`` names the folds, so
``fasthpa predict --run CVDIR`` averages them and applies the out-of-fold thresholds.

Every fold is an ordinary run folder: atomic, resumable, readable by ``fasthpa report``. An
interrupted cv resumes where it stopped: finished folds are kept, an interrupted one resumes
from its checkpoint, the rest start. The folds share one set of channel statistics (computed
once over every train row), so an ensemble decodes each test image once.

From Python: ``run_cv(cfg, folds=5) -> CVResult`` (``from fasthpa.cv import run_cv``).
"""

from fasthpa.cv.folds import CVResult, run_cv
from fasthpa.cv.oof import collect_oof

__all__ = ["CVResult", "collect_oof", "run_cv"]
