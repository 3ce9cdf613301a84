"""The runner: one run of the multi-agent pipeline, from its configuration (`config`) and
prompts (`prompts`, `answers`) through planning the graph (`planner`), communication
(`communication`), the decision node (`decision`) and training (`learner`), driven by
`pipeline` and `experiment`, on one process or several ranks (`distributed`)."""
