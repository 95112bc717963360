"""Supervised fine-tuning of ParaThinker models.

    data.py         the JSONL sample format, validation, tokenization, reference-row converter
    pack.py         samples -> packed rows with per-position targets; batch collation
    plan.py         which rows each optimizer step trains on (seeded, resumable)
    loss.py         the training forward: flex / SDPA attention, chunked cross-entropy
    checkpoints.py  engine-loadable checkpoints plus resume state
    trainer.py      the accelerate training loop (`train(TrainConfig)`)
    build_data.py   teacher sampling, grading and sample selection (`build_data(...)`)
    cli.py          `parathinker train` and `parathinker build-data`

Nothing heavy is imported here: `import parathinker.train` stays cheap.
"""
