"""The V-cycle inside the training loops users already have, one library run per stage.

- ``vcyclefx.integrations.hf``: ``train_vcycle`` runs one ``transformers.Trainer`` per stage;
- ``vcyclefx.integrations.lightning``: ``fit_vcycle`` runs one ``lightning.Trainer.fit()`` per
  stage of a LightningModule whose network is an attribute;
- accelerate: a short loop in README.md ("The V-cycle in an accelerate loop").

Each carries the AdamW moments through every transition by parameter name
(``Stage.map_optimizer_state``; ``vcyclefx.train.optim_state`` turns a library's positional
optimizer state into names and back), follows the driver's ``--lr-schedule global`` over the
whole cycle and logs one global step, token and FLOP count. The libraries are imported only by
the module that uses them: ``import vcyclefx`` imports none of them.
"""
