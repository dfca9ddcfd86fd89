"""Training: Ray Train's TorchTrainer with DeepSpeed in every worker.

Where things go:
- models.py     built-in model builders (mlp, cnn, transformer): builder(input_shape, num_classes, **args)
- arrays.py     ArrayDataset and the train/validation split (a seeded coin flip per row)
- data.py       built-in data sources (digits, synthetic) returning ArrayDataset
- file_source.py  files as a data source: checked on the driver, streamed to the workers by Ray Data
- worker_data.py  what one worker trains and evaluates on (its in-memory or streamed shard)
- augment.py    training-time augmentations (noise, shift, user hooks)
- ds_config.py  the DeepSpeed JSON derived from the Tandem config (overrides merge last)
- loop.py       the per-worker train loop (a plain function)
- resume.py     where a worker continues from: a retried group's, --resume's or a PBT donor's checkpoint
- trainer.py    train(config) -> TrainResult: builds the TorchTrainer, consolidates the artifact
- startup.py    what Tandem changes in Ray Train's start-up on a small local Ray, and why
- importing.py  `tandem import`: a state_dict trained elsewhere -> a verified artifact

May import: `cluster` (the foundation) only.
"""
