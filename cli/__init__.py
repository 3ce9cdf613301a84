"""The `gcache` command line (installed as the import package `gcache_cli`)."""
