"""The shell: everything that touches files, models, networks or processes.

- ``gcache.io.models``: loading local models (the embedded SmolLM2, Hugging Face ids,
  tiny random ones), their decode functions and quantization, sentence embeddings, the
  OpenAI-compatible API client and the four generation modes.
- ``gcache.io.tasks``: the benchmark datasets, answer extraction, scoring, and the sandbox
  that runs candidate programs.
- ``gcache.io.runner``: a run of the multi-agent pipeline: configuration, prompts, planning
  the graph, communication, the decision node, training, and data-parallel ranks.
- ``gcache.io.records``: what a run leaves behind: the run log, saved parameters,
  statistics and the report.
"""
