"""Training for long context: packed varlen data (`data`), the loop (`trainer`), FSDP2 and activation
checkpointing (`parallel`), checkpoints (`checkpoint`), configs (`config`), and the `train` / `extend`
verbs (`cli`, `extend`). Entry points: `Trainer(TrainConfig.from_toml(path)).train()`,
`longreach train --config FILE.toml`, `longreach extend --model DIR --rope yarn --factor 8 ...`.
"""
