"""moeray inside inference engines: ``transformers`` offloads a Hugging Face MoE model's experts
to a shard checkpoint and keeps each layer's hot set (docs/design.md) in memory, driven by an
``EngineSession`` (needs the ``hf`` extra; import the submodule, this package imports nothing)."""

__all__: list[str] = []
