"""Tasks: the datasets (`datasets`), answer extraction (`extract`), scoring (`scoring`),
code items as sandbox jobs (`programs`) and the sandbox (`sandbox`, `sandbox_child`)."""
