"""Rare-label models: the reference report's future work, as a command.

    fasthpa rare --run runs/r18                       # every label under 5% of the training part
    fasthpa rare --run runs/r18 --labels 8,9,10,27 --epochs 3
    fasthpa predict --run runs/r18 --data ROOT --out submission.csv    # uses them (--no-rare: not)

For each label rarer than ``--below`` (its frequency in the run's training part), a binary model
(``RUN/rare/label{l:02d}``, an ordinary run folder) is trained on a subsample of the run's
training part: all its positives and random negatives, so that positives make ``--share`` of
it (the report: at least 20%). It starts from the run's best checkpoint (its network, and its
classifier's row for the label) and uses the run's split and channel statistics. After a run
that refits (``--refit-heads``, the default recipe) it refits too: its classifier row on its
network's features and the location features of the whole training part, at the label's real
rate, thresholds from the out-of-fold scores by the run's rule; after one that does not, its
threshold is the exact cut on the run's dev part. ``fasthpa predict`` then takes each rare
label's probability from its model instead of the main one's (and its threshold).
``RUN/rare/summary.json`` and the table printed give each label's dev F1 from the main model
and from its own, and, when the run has a test part, the test part's per-label and macro F1
with and without them (README, "Rare-label models": so far they have cost F1 on held-out data).

From Python: ``train_rare_models(run_dir, below=0.05, share=0.2) -> dict``.
"""

from fasthpa.rare.models import rare_labels, train_rare_models

__all__ = ["rare_labels", "train_rare_models"]
