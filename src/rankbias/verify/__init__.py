"""Provenance checks of what is on disk: DVC state, audit, restore, publishing the cache,
the RO-Crate. Imports the layers below it."""
