"""The models the front serves: their specs (file, backend, settings, memory), routing by
name, and their life cycle (load, unload, reload, eviction)."""
