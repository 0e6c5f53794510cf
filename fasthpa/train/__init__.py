"""Train a multi-label HPA classifier: one CPU, one GPU, or many GPUs on many nodes.

Single process (CPU or one GPU)::

    python -m fasthpa.train --data ROOT --out runs/r18        # or: fasthpa train --data ROOT ...

One node, 8 GPUs::

    torchrun --nproc_per_node=8 -m fasthpa.train --data ROOT --out runs/r18 --batch-size 64

Two nodes (run on each, NODE_RANK 0 and 1; HOST = node 0's address)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=hpa1 -m fasthpa.train --data ROOT --out runs/r18

The run folder keeps config.json, env.json, split.csv, channel_stats.json, history.jsonl,
last.pt / best.pt, thresholds.json, dev_probs.npz and final_metrics.json. A folder that already
holds last.pt resumes by itself; SIGTERM/SIGINT save a checkpoint and exit cleanly.

From Python: ``train(cfg) -> TrainResult`` (``from fasthpa.train import train``).

The package, in the order a run goes through it::

    folder.py        start or resume: the run folder and its saved config (rank 0 decides)
    build.py         config + data + model + optimiser -> one Run object
    restore.py       the training state; a checkpoint read once on rank 0, broadcast
    loop.py          fit(): epochs of steps, delegating to
      step.py          one optimiser step (no host sync)
      meter.py         the log-step state and the loop's only host syncs
      evaluator.py     dev evaluation and thresholds; the held-out test part
      checkpointer.py  last.pt / best.pt, atomically, rank 0
    trainer.py       train(cfg): the stages above, start to finish
    cli.py           the command line (flags generated from fasthpa.config)
"""

from fasthpa.train.trainer import TrainHooks, TrainResult, train

__all__ = ["TrainHooks", "TrainResult", "train"]
