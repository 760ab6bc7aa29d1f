"""The training driver (``vcyclefx train``, ``tools/train.py``).

- ``config``: the typed, frozen :class:`TrainConfig` and its presets;
- ``data``: the default corpus (the Python standard library as bytes), ``--data`` files, batches;
- ``train``: the recipe ``main(cfg)`` -> setup -> train -> cleanup over the schedules of a run;
  ``startup``: ``setup``/``cleanup`` (device, process group, output directory, data, first model);
  ``schedule``: which schedules a run trains, their steps and learning rates; ``stage``:
  ``run_stage``, one stage's loop, with its FLOPs per token (``vcyclefx.train.flops``) and
  evaluation;
- ``checkpoint``: checkpoints of a run and resuming from them; ``parallel``: the module being
  trained as one process, DDP or FSDP2 (``Trainee``);
- ``logger``: metrics JSONL and the progress bar; ``plot``: summary, table and plot;
- ``cli``: the ``train`` subcommand, built from the config fields.

Importing this package is light (nothing but the standard library); import the submodules.
"""
