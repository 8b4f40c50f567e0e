"""Shared test helpers: the one CPU Trainer builder, the tiny LightningModule, free ports."""
