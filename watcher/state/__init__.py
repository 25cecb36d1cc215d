"""The state layer: the only package that holds SQL (see `watcher.state.store` for its map)."""
