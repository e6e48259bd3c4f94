"""Hyper-parameter defaults per backbone (TOML), shipped as cliper_prod.presets."""
