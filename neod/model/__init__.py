"""Llama-family model: HF config parsing, shape presets, weight loading and per-layer stages.

Import the submodules directly (`neod.model.llama`, `neod.model.config`, ...): `config` and
`presets` stay importable without torch.
"""
