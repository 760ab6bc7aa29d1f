"""The training driver (``vcyclefx train``, ``tools/train.py``).

- ``config``: the typed, frozen :class:`TrainConfig` and its presets;
- ``data``: the default corpus (the Python standard library as bytes), ``--data`` files, batches;
- ``train``: the recipe ``main(cfg)`` -> setup -> train -> cleanup, ``run_stage`` and
  ``training_flops_per_token``;
- ``checkpoint``: checkpoints of a run and resuming from them; ``parallel``: the module being
  trained as one process, DDP or FSDP2 (``Trainee``);
- ``logger``: metrics JSONL and the progress bar; ``plot``: summary, table and plot;
- ``cli``: the ``train`` subcommand, built from the config fields.

Importing this package is light (nothing but the standard library); import the submodules.
"""
