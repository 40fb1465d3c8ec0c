"""Pure PyTorch building blocks shared by the systems (FSQ, Mamba-2 SSD, ...).

`cambium.nn` imports only `cambium.core`; every fast path here has a slow reference next to it.
"""
