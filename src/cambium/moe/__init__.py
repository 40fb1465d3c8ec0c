"""cambium.moe: DeepSeek-shaped mixture-of-experts language-model training (spec: docs/moe.md).

`model.py` holds the decoder-only transformer, `config.py` the config models (`CONFIG_MODEL`).
"""
