"""The floor under the pipeline: FX graph helpers with no vcyclefx imports.

Argument access by schema name and typed edits (``args``), op sets (``ops``), the train/eval
switch of ops baked into a captured graph (``mode``), device literals (``device``) and the
size-arithmetic normaliser (``normalize``). Capture, the analysis rules, the plan, the passes and
the Level type all stand on it, so imports run one way: capture -> analysis -> plan -> passes.
"""
