"""The base layer: errors, files, signals and seeded generators; imports nothing else of xpcnn's."""
