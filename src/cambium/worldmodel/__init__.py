"""The market world model: Strate I FSQ tokenizer, Strate II Mamba-2 JEPA encoder (then III flow futures, IV agent).

Public entry points: `FSQTokenizer` (candles → codes), `WorldModelJEPA` (codes + clock → latents, `encode(candles)`),
`CONFIG_MODEL` (the root config of `configs/worldmodel/*.toml`), `pipeline.run_pipeline` (import → Strate I →
pretokenize → Strate II → WM-7 probes and report, one resumable run), `cambium worldmodel` (`cli.app`).
"""
