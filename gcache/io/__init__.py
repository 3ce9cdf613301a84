"""The shell: models, tokenizers, API clients, datasets, sandbox, graph runner, run logs."""
