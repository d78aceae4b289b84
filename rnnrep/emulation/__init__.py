"""Emulation-based self-supervised learning: an emulator conditioned on a weight embedding imitates the member."""
